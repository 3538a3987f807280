"""The README's commands and examples stay true."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(b.strip() for b in _bash_blocks() if "pytest" in b and "pip install" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def _run_python_block(index: int) -> list[str]:
    example = re.findall(r"```python\n(.*?)```", README, re.S)[index]
    return subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, check=True).stdout.splitlines()


def test_python_example_runs_and_prints_what_it_says():
    lines = _run_python_block(0)
    assert lines[0] == "[[0, 2], [5, 3], [0, -1]]"
    assert lines[1] == "[1, 0, 1, 1, 0, 1]"
    assert lines[2] == "[1, 0, 1, 6, 0, 3]"
    assert lines[3] == "Lowering.TOPK"
    assert lines[4] == "Lowering.COUNTS"
    assert lines[5] == "backend provides no exact per-expert counts"
    assert lines[6] == "[[0, 2], [5, 3], [-1, -1]]"


def test_metrics_example_prints_what_it_says():
    assert _run_python_block(1) == [
        "[[4.0, 4.0], [8.0, 2.0]]",
        "[1.0, 1.6]",
        "[0.0, 0.6]",
        "0.75",
        "4194303",
        "True True",
    ]
