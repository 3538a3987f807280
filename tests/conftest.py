import os

import torch
from hypothesis import HealthCheck, settings

if torch.cuda.is_available():
    from eplb_compile.kernels import eager_extension

    # Build the C++ eager launcher before any test runs, so the eager calls the
    # GPU tests make take it wherever it has a table (not only once the
    # background build happens to finish).
    eager_extension.wait()

# CI's budget: a bounded fuzz by default, a long one with HYPOTHESIS_PROFILE=long.
settings.register_profile(
    "ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
