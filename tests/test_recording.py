"""The recording format module on its own: what it writes it reads back, and the report needs nothing else."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from eplb_compile import recording
from eplb_compile.recording import START_UP_STEP, ModelInfo, ModelSteps

INFO = ModelInfo("m", ["layers.0", "layers.1"], 3, 4, 2)


def _write(record_dir, rank, chunk, steps, **header_options):
    header = recording.make_header(chunk, rank, 2, {"vllm_version": "x"}, [INFO], **header_options)
    return recording.write_chunk(str(record_dir), header, recording.chunk_tensors([INFO], [steps]))


def test_what_is_written_reads_back_summed_over_ranks(tmp_path):
    start_map = torch.tensor([[0, 1, 2, -1], [2, 1, 0, -1]])
    load = torch.arange(2 * 2 * 4, dtype=torch.int32).view(2, 2, 4)
    for rank in (0, 1):
        path = _write(tmp_path, rank, 0, ModelSteps([0, 1], load * (rank + 1), [START_UP_STEP], start_map[None]))
        assert path.endswith(f"rank{rank}/chunk-000000.safetensors")
    _write(tmp_path, 0, 1, ModelSteps([2], load[:1], [], torch.zeros(0, 2, 4, dtype=torch.int64)))
    read = recording.read_recording(str(tmp_path))
    assert read.ep_size == 2 and read.header["vllm_version"] == "x" and read.steps_missing_on_some_rank == 1
    (info, steps), = read.models
    assert info == {"name": "m", "layer_names": ["layers.0", "layers.1"], "num_logical": 3, "num_physical": 4,
                    "window_size": 2}
    assert steps.steps == [0, 1] and torch.equal(torch.from_numpy(steps.load), (load * 3).long())
    assert steps.map_steps == [START_UP_STEP] and torch.equal(torch.from_numpy(steps.maps), start_map[None])


def test_steps_whose_map_no_chunk_holds_are_left_out_and_said(tmp_path):
    for rank in (0, 1):
        _write(tmp_path, rank, 0, ModelSteps([0], torch.zeros(1, 2, 4, dtype=torch.int32), [],
                                             torch.zeros(0, 2, 4, dtype=torch.int64)))
    read = recording.read_recording(str(tmp_path))
    assert read.models[0][1].steps == []
    assert "model 'm': steps 0 left out: the map that routed them is in no readable chunk" in read.damage


def _steps(steps, with_map=True):
    maps = torch.zeros(1 if with_map else 0, 2, 4, dtype=torch.int64)
    return ModelSteps(steps, torch.ones(len(steps), 2, 4, dtype=torch.int32), [START_UP_STEP] if with_map else [], maps)


@pytest.mark.parametrize("second_run", ["b", None])
def test_chunks_of_two_runs_in_one_rank_folder_are_refused(tmp_path, second_run):
    """A server restarted into the same folder: its chunks are numbered from 0 again, some overwrite the first
    run's. Summing them would count steps twice; the reader says so instead (an id missing counts as one)."""
    for rank in (0, 1):
        _write(tmp_path, rank, 0, _steps([0, 1]), run_id="a")
    _write(tmp_path, 0, 1, _steps([7], with_map=False), run_id=second_run)
    with pytest.raises(recording.RecordingError) as raised:
        recording.read_recording(str(tmp_path))
    run_ids = ", ".join(sorted(["a", str(second_run)]))
    assert str(raised.value) == (f"{tmp_path}: rank0 holds chunks of 2 runs ({run_ids}); record each run into its "
                                 "own folder")


def test_a_step_in_two_chunks_of_one_rank_is_refused_not_counted_twice(tmp_path):
    for rank in (0, 1):
        _write(tmp_path, rank, 0, _steps([0, 1]))
        _write(tmp_path, rank, 1, _steps([2], with_map=False))
    _write(tmp_path, 1, 2, _steps([1, 3], with_map=False))  # older files: no run id to tell the runs apart
    with pytest.raises(recording.RecordingError, match=r"rank1 chunks 0 and 2 both hold step 1 "):
        recording.read_recording(str(tmp_path))


def test_the_report_reads_through_the_format_module_only():
    source = Path(recording.__file__).with_name("report.py").read_text()
    imported = [node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)]
    assert "eplb_compile.recording" in imported
    assert not [name for name in imported if name and "vllm_plugin" in name]


def test_the_numpy_writer_writes_the_bytes_safetensors_torch_writes(tmp_path):
    """The writer takes the recorder's torch tensors and writes through numpy: the files are unchanged."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    steps = ModelSteps([0, 3], torch.arange(16, dtype=torch.int32).view(2, 2, 4), [START_UP_STEP],
                       torch.tensor([[[0, 1, 2, -1], [2, 1, 0, 0]]]))
    path = _write(tmp_path / "numpy", 0, 0, steps)
    with safe_open(path, "np") as handle:
        metadata = handle.metadata()
    tensors = {name: torch.from_numpy(array) for name, array in recording.read_chunk(path)[1].items()}
    assert tensors["model0.load"].dtype == torch.int32 and tensors["model0.maps"].dtype == torch.int64
    save_file(tensors, str(tmp_path / "torch.safetensors"), metadata=metadata)
    assert (tmp_path / "torch.safetensors").read_bytes() == Path(path).read_bytes()


def test_a_step_range_sums_only_its_steps_and_the_report_gives_what_it_gives_for_the_whole(tmp_path, capsys,
                                                                                          monkeypatch):
    """``--steps`` bounds the reader's buffers, not only what is printed: the reader sums the range's steps,
    and the report (maps, rearrangements, damage) is the one it gives from the whole recording."""
    import json

    from tests.test_report import make_recording, run_report

    from eplb_compile import report

    make_recording(tmp_path)  # steps 0, 1, 3, 4, 6; the map changes at 3
    (tmp_path / "rank1" / "chunk-000002.safetensors").unlink()  # rank 1 loses step 6: a damage line
    whole = recording.read_recording(str(tmp_path))
    ranged = recording.read_recording(str(tmp_path), steps=(1, 4))
    (_, whole_steps), = whole.models
    (_, ranged_steps), = ranged.models
    assert ranged_steps.steps == [1, 3] and ranged_steps.load.shape[0] == 2
    assert (ranged_steps.load == whole_steps.load[1:3]).all()
    assert ranged_steps.map_steps == whole_steps.map_steps and (ranged_steps.maps == whole_steps.maps).all()
    assert ranged.damage == whole.damage and ranged.steps_missing_on_some_rank == whole.steps_missing_on_some_rank
    read = []
    monkeypatch.setattr(report, "read_recording",
                        lambda *args: read.append(recording.read_recording(*args)) or read[-1])
    assert run_report(str(tmp_path), "--json", "--steps", "1:4") == 0
    assert [s.steps for _, s in read[0].models] == [[1, 3]]
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report.summarize(whole, steps=(1, 4))))


def test_with_no_readable_chunk_the_lowest_rank_and_chunk_is_named_first(tmp_path):
    for rank, chunk in ((10, 0), (2, 10), (2, 9)):  # alphabetically rank10/ comes before rank2/
        folder = tmp_path / f"rank{rank}"
        folder.mkdir(exist_ok=True)
        (folder / f"chunk-{chunk:06d}.safetensors").write_bytes(b"cut")
    with pytest.raises(recording.RecordingError) as raised:
        recording.read_recording(str(tmp_path))
    assert str(raised.value).startswith(f"{tmp_path}: no readable chunk; first: {tmp_path}/rank2/chunk-000009."
                                        f"safetensors: truncated or corrupt (")


def test_the_header_checksum_is_of_the_header_as_read_back(tmp_path):
    """JSON turns int keys into strings, which sort otherwise: the checksum is of what the reader parses."""
    header = recording.make_header(0, 0, 2, {"vllm_version": "x"}, [INFO], counters={2: 1, 10: 3}, run_id="u")
    path = recording.write_chunk(str(tmp_path), header, recording.chunk_tensors([INFO], [_steps([0])]))
    read, _ = recording.read_chunk(path)
    assert read["run_id"] == "u" and read["counters"] == {"2": 1, "10": 3}
