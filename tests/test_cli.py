"""The CLI reports a user's mistake on one line naming the option, exit status 2, before any work."""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eplb_compile import capture, demo, ep_simulation
from eplb_compile.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_long_work(monkeypatch):
    """Any error case that reached the run, the capture or the simulation fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("the long work started before the arguments were checked")

    monkeypatch.setattr(demo, "run_demo", refuse)
    monkeypatch.setattr(capture, "capture_graphs", refuse)
    monkeypatch.setattr(capture, "regenerate", refuse)
    monkeypatch.setattr(ep_simulation, "run_spawned", refuse)


def _user_error(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


def _pickle(tmp_path: Path, name: str, value) -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(value))
    return path


@pytest.mark.parametrize(
    "argv, option, expected",
    [
        (["--layers", "0"], "--layers", "integer >= 1, got 0"),
        (["--layers", "-2"], "--layers", "integer >= 1, got -2"),
        (["--layers", "many"], "--layers", "integer from 1 to 256, got 'many'"),
        (["--layers", "257"], "--layers", "integer <= 256, got 257"),
        (["--seed", str(10**23)], "--seed", f"integer <= {2**63 - 1}, got {10**23}"),
        (["--seed", "-1"], "--seed", "integer >= 0, got -1"),
        (["--tokens-per-rank", str(10**12)], "--tokens-per-rank", f"integer <= 65536, got {10**12}"),
        (["--steps", "100001"], "--steps", "integer <= 100000, got 100001"),
        (["--ep-size", str(10**9)], "--ep-size", f"integer <= 1024, got {10**9}"),
        (["--count-path-min-tokens", str(2**31)], "--count-path-min-tokens", f"integer <= {2**31 - 1}"),
        (["--plot", "/proc/imbalance.png"], "--plot", "'/proc/imbalance.png' cannot be written"),
        (["--save-window", "/proc/window.pt"], "--save-window", "'/proc/window.pt' cannot be written"),
        (["--save-window", "/proc/version"], "--save-window", "'/proc/version' cannot be written"),
        (["--steps", "0"], "--steps", "integer >= 1, got 0"),
        (["--steps", "-1"], "--steps", "integer >= 1, got -1"),
        (["--tokens-per-rank", "0"], "--tokens-per-rank", "integer >= 1, got 0"),
        (["--tokens-per-rank", "-8"], "--tokens-per-rank", "integer >= 1, got -8"),
        (["--ep-size", "0"], "--ep-size", "integer >= 1, got 0"),
        (["--ep-size", "3"], "--ep-size", "one of 1, 2, 4, 5, 10, 20; got 3"),
        (["--ep-size", "40"], "--ep-size", "one of 1, 2, 4, 5, 10, 20; got 40"),
        (["--count-path-min-tokens", "-5"], "--count-path-min-tokens", "integer >= 0, got -5"),
        (["--plot", "missing_dir/imbalance.png"], "--plot", "directory 'missing_dir' does not exist"),
        (["--plot", "imbalance.jpg"], "--plot", "must be a .png file"),
        (["--plot", "."], "--plot", "must be a .png file"),
        (["--save-window", "missing_dir/window.pt"], "--save-window", "directory 'missing_dir' does not exist"),
    ],
)
def test_demo_user_errors(argv, option, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = _user_error(["demo", "--eager", *argv], capsys)
    assert line.startswith(f"eplb-compile demo: error: argument {option}: ") and expected in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes a read-only file")
def test_a_read_only_window_file_is_refused_before_the_run(capsys, tmp_path):
    window = tmp_path / "window.pt"
    window.write_bytes(b"old")
    window.chmod(0o444)
    line = _user_error(["demo", "--save-window", str(window)], capsys)
    assert "argument --save-window:" in line and "cannot be written" in line
    assert window.read_bytes() == b"old"


def test_unwritable_output_directories_are_refused_before_the_work(capsys):
    line = _user_error(["examples", "--out", "/proc"], capsys)
    assert "argument --out: directory '/proc' cannot be written" in line
    line = _user_error(["graphs", "--regenerate", "--out", "/proc"], capsys)
    assert "argument --out: directory '/proc' cannot be written" in line


def test_an_existing_directory_is_not_a_window_file(capsys, tmp_path):
    line = _user_error(["demo", "--save-window", str(tmp_path)], capsys)
    assert "argument --save-window:" in line and "is a directory" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
@pytest.mark.parametrize("command", ["demo", "graphs"])
def test_cuda_without_a_gpu(command, capsys):
    line = _user_error([command, "--device", "cuda"], capsys)
    assert f"eplb-compile {command}: error: argument --device: " in line and "no CUDA device" in line


def test_graphs_regenerate_needs_an_existing_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no graphs/ here
    line = _user_error(["graphs", "--regenerate"], capsys)
    assert "argument --out: directory 'graphs' does not exist" in line
    line = _user_error(["graphs", "--regenerate", "--out", str(tmp_path / "nope")], capsys)
    assert "argument --out:" in line and "nope" in line


def test_plot_user_errors(capsys, tmp_path):
    window = tmp_path / "window.pt"
    torch.save(torch.zeros(2, 3, 8, dtype=torch.int32), window)
    cases = [
        ([str(tmp_path / "none.pt")], "argument load: no such file"),
        ([str(_pickle(tmp_path, "object.pt", object()))], "is not a saved load window"),
        ([str(_pickle(tmp_path, "junk.pt", b"junk"))], "is not a saved load window"),
        ([str(window), "-o", str(tmp_path / "missing" / "heat.png")], "argument -o/--output: directory"),
        ([str(window), "--ep-size", "3"], "argument --ep-size: must divide the 8 physical experts"),
        ([str(window), "--ep-size", "0"], "argument --ep-size: must be an integer >= 1"),
    ]
    for path, value in (("dict.pt", {"load": torch.zeros(2, 8, dtype=torch.int32)}),
                        ("float.pt", torch.zeros(2, 8)), ("flat.pt", torch.zeros(8, dtype=torch.int32))):
        torch.save(value, tmp_path / path)
        cases.append(([str(tmp_path / path)], "not a saved load window"))
    for path, value, kind in (("sparse.pt", torch.ones(2, 8, dtype=torch.int32).to_sparse(), "sparse_coo"),
                              ("meta.pt", torch.ones(2, 8, dtype=torch.int32, device="meta"), "meta")):
        torch.save(value, tmp_path / path)
        cases.append(([str(tmp_path / path)], f"holds a {kind} tensor, not a dense one"))
    cases.append(([str(window), "-o", "/proc/heat.png"], "argument -o/--output: '/proc/heat.png' cannot be written"))
    for argv, expected in cases:
        defaults = {"--ep-size": "4", "-o": str(tmp_path / "heat.png")}
        argv = argv + [word for option, value in defaults.items() if option not in argv for word in (option, value)]
        line = _user_error(["plot", *argv], capsys)
        assert line.startswith("eplb-compile plot: error: ") and expected in line, line
        # The file's expected contents are said; unsafe loading never suggested.
        assert "weights_only" not in line
    assert not (tmp_path / "heat.png").exists()


def test_plot_draws_a_saved_window(capsys, tmp_path):
    window = tmp_path / "window.pt"
    torch.save(torch.randint(0, 50, (4, 3, 16), dtype=torch.int32, generator=torch.Generator().manual_seed(3)), window)
    heat = tmp_path / "heat.png"
    assert main(["plot", str(window), "--ep-size", "4", "-o", str(heat)]) == 0
    assert heat.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"wrote {heat}\n"


@pytest.mark.parametrize(
    "argv", [["plot", "window.pt", "--ep-size", "4"], ["demo", "--plot", "imbalance.png"], ["examples"]]
)
def test_plotting_without_matplotlib_says_how_to_install_it(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "graphs").mkdir()
    torch.save(torch.zeros(2, 8, dtype=torch.int32), tmp_path / "window.pt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    line = _user_error(argv, capsys)
    assert "needs matplotlib" in line and "pip install 'eplb-compile[plot]'" in line


def test_examples_user_errors(capsys, tmp_path):
    assert "argument --ranks: must divide the 16 physical experts" in _user_error(["examples", "--ranks", "3"], capsys)
    line = _user_error(["examples", "--out", str(tmp_path / "missing" / "deeper")], capsys)
    assert "argument --out:" in line and "does not exist" in line
    (tmp_path / "README.md").write_text("x")
    line = _user_error(["examples", "--out", str(tmp_path / "README.md")], capsys)
    assert "argument --out:" in line and "is a file, expected a directory" in line


def test_examples_never_writes_into_the_repository_by_default():
    from eplb_compile.cli import build_parser

    assert build_parser().parse_args(["examples"]).out == Path("eplb_compile_examples")


def test_plot_of_a_directory_says_so(capsys, tmp_path):
    line = _user_error(["plot", str(tmp_path), "--ep-size", "4", "-o", str(tmp_path / "h.png")], capsys)
    assert "is a directory" in line and "no such file" not in line


def test_help_shows_no_rst_backticks(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "``" not in capsys.readouterr().out


def test_bench_offers_no_device_it_refuses(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "--device" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, option",
    [(["demo", "--ep-size", "0"], "--ep-size"), (["demo", "--tokens-per-rank", "0"], "--tokens-per-rank"),
     (["demo", "--seed", str(10**23)], "--seed"), (["demo", "--tokens-per-rank", str(10**12)], "--tokens-per-rank")],
)
def test_installed_entry_point_prints_no_traceback(argv, option, tmp_path):
    """Through ``python -m eplb_compile``, as a user runs it."""
    done = subprocess.run([sys.executable, "-m", "eplb_compile", *argv], capture_output=True, text=True,
                          cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and f"argument {option}:" in done.stderr, done.stderr


@pytest.mark.parametrize("command", ["demo", "graphs"])
def test_a_refused_launcher_switch_is_one_line_before_any_work(command, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the GPU check, to the switch
    monkeypatch.setenv("EPLB_COMPILE_EAGER_LAUNCHER", "maybe")
    line = _user_error([command, "--device", "cuda"], capsys)
    assert "EPLB_COMPILE_EAGER_LAUNCHER must be one of" in line and "'maybe'" in line


@pytest.mark.parametrize("argv, expected", [
    (["report", "records", "--top", str(10**20)], "argument --top: must be an integer <= 1024"),
    (["report", "records", "--top", "0"], "argument --top: must be an integer >= 1"),
])
def test_report_int_options_are_bounded(argv, expected, capsys):
    assert expected in _user_error(argv, capsys)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="bench's options exist where Triton does")
@pytest.mark.parametrize("argv, expected", [
    (["--seed", str(10**23)], "argument --seed: must be an integer <= 9223372036854775807"),
    (["--num-redundant", "-1"], "argument --num-redundant: must be an integer >= 0"),
    (["--layers", str(10**6)], "argument --layers: must be an integer <= 1024"),
    (["--tokens", f"1,{10**11}"], "argument --tokens: expected token counts from 1 to 4194304"),
])
def test_bench_int_options_are_bounded(argv, expected, capsys):
    assert expected in _user_error(["bench", *argv], capsys)
