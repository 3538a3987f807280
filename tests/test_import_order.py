"""Every module of the operators' packages imports first, alone, in a fresh process.

The package's top-level names are lazy (PEP 562), so nothing imports ``eplb_compile.ops``
ahead of the module a user (or ``tests/conftest.py`` on a GPU machine) imports first; an
import cycle between ``ops`` and ``kernels`` shows only then.
"""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import eplb_compile.kernels
import eplb_compile.ops

MODULES = sorted(f"{package.__name__}.{info.name}" for package in (eplb_compile.kernels, eplb_compile.ops)
                 for info in pkgutil.iter_modules(package.__path__))


def test_the_list_is_not_empty():
    assert "eplb_compile.kernels.eager_extension" in MODULES and "eplb_compile.ops._library" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_imports_first_in_a_fresh_process(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
