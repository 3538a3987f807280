"""vLLM integration: the ``eplb_load_update`` custom op.

Loaded through the ``vllm.general_plugins`` entry point, :func:`register`
adds three things to vLLM, without a fork or a patch file:

1. A ``CustomOp`` named ``eplb_load_update`` (``load_update.py``). vLLM decides
   whether it is on exactly as for its own ops: ``"+eplb_load_update"``, or
   ``"all"`` without ``"-eplb_load_update"``, in ``CompilationConfig.custom_ops``.
2. A capability method on vLLM's prepare/finalize classes
   (``backends.py``): do they count tokens exactly per local expert?
3. A hook after ``MoERunner.__init__`` that attaches the op to every EPLB
   layer. With the op off nothing is replaced, so the layer runs vLLM's code.
4. Hooks on ``EplbState`` (``eplb_step_hook.py``) for the load recorder and the
   Prometheus exporter, which do nothing unless
   ``additional_config["eplb_compile"]`` asks for them (``config.py``).

Every vLLM internal the plugin touches, the op's and the ``EplbState``
recorder hook's, is in ``vllm_surface.py``. Importing
this package imports no vLLM; :func:`register` does.
"""

from __future__ import annotations

import logging

OP_NAME = "eplb_load_update"
LOG_TAG = f"{OP_NAME}:"  # every log line of the plugin starts with it
LOGGER_NAME = f"vllm.{__name__}"  # a child of vLLM's logger: same handler and format

# vLLM releases whose internals (vllm_surface.py) were checked and tested.
SUPPORTED_VLLM_VERSIONS = ("0.32.0", "0.33.0", "0.34.0")


def register() -> None:
    """The ``vllm.general_plugins`` entry point.

    vLLM calls it in every process, possibly more than once; every step
    checks vLLM's own state first, so repeated calls change nothing. On a vLLM
    release it was not checked against, it installs nothing and says so once.
    """
    from eplb_compile.vllm_plugin import vllm_surface

    version = vllm_surface.vllm_version()
    if version.split("+")[0] not in SUPPORTED_VLLM_VERSIONS:
        _warn_unsupported_once(version)
        return
    from eplb_compile.vllm_plugin import backends, eplb_step_hook, load_update  # importing registers the op

    backends.install()
    vllm_surface.after_moe_runner_init(load_update.attach)
    eplb_step_hook.install()  # the recorder and exporter, off unless additional_config asks


_warned_versions: set[str] = set()


def _warn_unsupported_once(version: str) -> None:
    if version in _warned_versions:
        return
    _warned_versions.add(version)
    logging.getLogger(LOGGER_NAME).warning(
        "%s vLLM %s is not supported (supported: %s); eplb_compile leaves vLLM stock",
        LOG_TAG, version, ", ".join(SUPPORTED_VLLM_VERSIONS),
    )
