"""eplb_compile/ops/README.md's example prints what the page says it prints."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = (ROOT / "eplb_compile" / "ops" / "README.md").read_text()


def test_example_prints_what_the_page_says():
    example, printed = re.findall(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", PAGE, re.S)[0]
    # No compile cache: the page's own section says why.
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == printed
