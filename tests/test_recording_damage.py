"""Recordings after faults: lost, cut, malformed chunks, a full disk, a killed writer.

The report must read around what is lost, say which rank, chunk, steps and
maps, and never attribute load to a map that did not route it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tests.test_report import EP_SIZE, INFO, LAYERS, LOGICAL, PHYSICAL, make_recorder, make_recording, run_report

from eplb_compile import metrics, recording


def report_json(capsys, path) -> dict:
    assert run_report(str(path), "--json") == 0
    return json.loads(capsys.readouterr().out)


def expected_logical(made: dict, routed_by: dict[int, int]) -> list:
    """The logical load of the given steps, each with the map index named for it."""
    logical = torch.zeros((LAYERS, LOGICAL), dtype=torch.int64)
    for step, map_index in routed_by.items():
        total = made["passes"][0, step] + made["passes"][1, step]
        logical += metrics.logical_load(total, made["maps"][map_index], LOGICAL)
    return logical.tolist()


def test_losing_the_chunk_with_the_start_up_map_loses_only_its_steps(tmp_path, capsys):
    made = make_recording(tmp_path)  # chunks: 0 = start-up map + steps 0, 1; 1 = steps 3, 4 + map at 3; 2 = step 6
    for rank in range(EP_SIZE):
        (tmp_path / f"rank{rank}" / "chunk-000000.safetensors").unlink()
    summary = report_json(capsys, tmp_path)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [3, 4, 6]
    assert model["logical_load"] == expected_logical(made, {3: 0, 4: 1, 6: 1})  # chunk 1 carries the start-up map
    assert summary["damage"] == [
        f"rank {rank} chunk 0 lost: absent (a failed flush: full disk or write error, or a deleted file); its steps "
        f"before 3 and any map committed then are not in the recording of rank {rank}" for rank in range(EP_SIZE)]


def test_losing_the_chunk_with_a_rearrangement_keeps_the_map_that_routed_later_steps(tmp_path, capsys):
    made = make_recording(tmp_path)
    for rank in range(EP_SIZE):
        (tmp_path / f"rank{rank}" / "chunk-000001.safetensors").unlink()
    summary = report_json(capsys, tmp_path)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [0, 1, 6]
    # Step 6 was routed by the map committed at step 3, which only the lost chunk recorded as a change:
    # chunk 2 carries it as its map in force.
    assert model["logical_load"] == expected_logical(made, {0: 0, 1: 0, 6: 1})
    assert [c["step"] for c in model["rearrangements"]] == [3]
    assert all("chunk 1 lost" in line and "steps after 1 and before 6" in line for line in summary["damage"])


def corrupt(path, mutate) -> None:
    """Rewrite a chunk with ``mutate(header, tensors)`` applied (on torch tensors) and checksums that match it."""
    from safetensors.torch import save_file

    header, arrays = recording.read_chunk(str(path))
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    mutate(header, tensors)
    header["crc32"] = {name: recording._crc32(tensor) for name, tensor in tensors.items()}
    header["header_crc32"] = recording._header_crc32(header)
    save_file(tensors, str(path), metadata={recording.HEADER_KEY: json.dumps(header)})


def set_model_key(key, value):
    return lambda header, tensors: header["models"][0].update({key: value})


def set_tensor(name, make):
    return lambda header, tensors: tensors.update({name: make(tensors[name])})


MALFORMED = {
    "header 'ep_rank' is None": lambda header, tensors: header.pop("ep_rank"),
    "header 'models' missing": lambda header, tensors: header.pop("models"),
    "model 0: num_logical 0": set_model_key("num_logical", 0),
    "model0.load is float32": set_tensor("model0.load", lambda t: t.float()),
    "model0.load is (2, 2, 8), not (2, 3, 8)": set_tensor("model0.load", lambda t: t[:, :2].contiguous()),
    "model0.load is (1, 3, 8), not (2, 3, 8)": set_tensor("model0.load", lambda t: t[:1].contiguous()),
    "model0.load is int32 (3, 8), not 3-D": set_tensor("model0.load", lambda t: t[0].contiguous()),
    "model0.load has negative counts": set_tensor("model0.load", lambda t: -t - 1),
    "no tensor model0.load": lambda header, tensors: tensors.pop("model0.load"),
    "model0.maps names a logical expert outside 0..5": set_tensor("model0.maps", lambda t: t + LOGICAL),
    "model0.maps is float32": set_tensor("model0.maps", lambda t: t.float()),
    "model0.maps is (1, 3, 7), not (1, 3, 8)": set_tensor("model0.maps", lambda t: t[..., :7].contiguous()),
    "model0.steps are not increasing": set_tensor("model0.steps", lambda t: t.flip(0).contiguous()),
}


@pytest.mark.parametrize("problem", sorted(MALFORMED))
def test_a_malformed_chunk_is_read_around_and_named(tmp_path, capsys, problem):
    make_recording(tmp_path)
    corrupt(tmp_path / "rank1" / "chunk-000001.safetensors", MALFORMED[problem])
    summary = report_json(capsys, tmp_path)
    assert [s["step"] for s in summary["models"][0]["steps"]] == [0, 1, 6]
    assert summary["damage"][0].startswith("rank 1 chunk 1 lost: ")
    assert f"chunk-000001.safetensors: malformed chunk ({problem}" in summary["damage"][0]


def test_flipped_bytes_fail_the_checksum(tmp_path, capsys):
    make_recording(tmp_path)
    path = tmp_path / "rank0" / "chunk-000001.safetensors"
    data = bytearray(path.read_bytes())
    data[-64:] = bytes(b ^ 0xFF for b in data[-64:])
    path.write_bytes(bytes(data))
    summary = report_json(capsys, tmp_path)
    assert "fails its checksum" in summary["damage"][0] and summary["damage"][0].startswith("rank 0 chunk 1 lost")


HEADER_FLIPS = {  # one byte of the JSON header (escaped inside the safetensors header) changed
    "its JSON unparseable": (b'\\"final\\": ', b'\\"final\\"; '),
    "its version": (b'\\"version\\": 2', b'\\"version\\": 3'),
    "a layer name": (b"layers.0", b"layerz.0"),
    "a counter": (b'\\"dropped_ring_full\\": 0', b'\\"dropped_ring_full\\": 7'),
}


@pytest.mark.parametrize("flipped", sorted(HEADER_FLIPS))
def test_a_flipped_byte_in_a_chunks_header_is_read_around(tmp_path, capsys, flipped):
    made = make_recording(tmp_path)
    path = tmp_path / "rank1" / "chunk-000001.safetensors"
    old, new = HEADER_FLIPS[flipped]
    data = path.read_bytes()
    assert data.count(old) >= 1
    path.write_bytes(data.replace(old, new, 1))
    summary = report_json(capsys, tmp_path)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [0, 1, 6]
    assert model["logical_load"] == expected_logical(made, {0: 0, 1: 0, 6: 1})
    assert summary["damage"][0].startswith("rank 1 chunk 1 lost: ")
    assert "chunk-000001.safetensors: " in summary["damage"][0]


def test_a_chunk_without_a_header_checksum_is_read(tmp_path, capsys):
    """Files written before the header had its checksum are read as before."""
    from safetensors.numpy import save_file

    make_recording(tmp_path)
    path = tmp_path / "rank0" / "chunk-000001.safetensors"
    header, tensors = recording.read_chunk(str(path))
    del header["header_crc32"]  # written by this eplb_compile
    header["vllm_version"] += "-older"  # and the header's other bytes are not checked then
    save_file(tensors, str(path), metadata={recording.HEADER_KEY: json.dumps(header)})
    summary = report_json(capsys, tmp_path)
    assert summary["damage"] == [] and [s["step"] for s in summary["models"][0]["steps"]] == [0, 1, 3, 4, 6]


def test_a_load_that_fails_its_checksum_is_read_around_and_the_rest_summed_once(tmp_path, capsys):
    """The loads are checked when they are summed (the second pass): the chunk is then read around as if
    the first pass had found it, and no step counts twice."""
    made = make_recording(tmp_path)
    path = tmp_path / "rank1" / "chunk-000001.safetensors"
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    start, _ = json.loads(data[8:8 + header_size])["model0.load"]["data_offsets"]
    data[8 + header_size + start + 5] ^= 0x01  # one bit of one count: still a valid, non-negative int32
    path.write_bytes(bytes(data))
    summary = report_json(capsys, tmp_path)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [0, 1, 6]
    for s in model["steps"]:
        assert s["tokens"] == (made["passes"][0, s["step"]] + made["passes"][1, s["step"]]).sum().item()
    assert model["logical_load"] == expected_logical(made, {0: 0, 1: 0, 6: 1})
    assert summary["damage"][0].startswith("rank 1 chunk 1 lost: ")
    assert "chunk-000001.safetensors: malformed chunk (model0.load fails its checksum)" in summary["damage"][0]


@pytest.mark.parametrize("change", ["deleted", "cut"])
def test_a_chunk_lost_between_the_two_passes_is_read_around(tmp_path, capsys, monkeypatch, change):
    """A chunk deleted or cut after its header was read (a cleanup job, a restarted writer) is read around
    like a chunk whose loads fail their checksum."""
    from eplb_compile import recording_reader

    made = make_recording(tmp_path)
    path = tmp_path / "rank1" / "chunk-000001.safetensors"
    read_load = recording_reader.read_load

    def losing_the_chunk_first(file, *args):
        if file == str(path) and path.exists():
            path.unlink() if change == "deleted" else path.write_bytes(path.read_bytes()[:100])
        return read_load(file, *args)

    monkeypatch.setattr(recording_reader, "read_load", losing_the_chunk_first)
    summary = report_json(capsys, tmp_path)
    (model,) = summary["models"]
    assert [s["step"] for s in model["steps"]] == [0, 1, 6]
    assert model["logical_load"] == expected_logical(made, {0: 0, 1: 0, 6: 1})
    assert summary["damage"][0].startswith(f"rank 1 chunk 1 lost: {path}: unreadable on the second read (")


def write_chunks(record_dir, rank: int, kept: list[int], last: int) -> None:
    """Chunks ``kept`` of one rank, chunk n holding step n (chunk 0 also the start-up map), ``last`` the final one."""
    from eplb_compile.recording import ModelInfo, ModelSteps

    info = ModelInfo("m", ["l0"], 4, 4, 10)
    for number in kept:
        maps = ([-1], torch.arange(4).view(1, 1, 4)) if number == 0 else ([], torch.zeros((0, 1, 4), dtype=torch.int64))
        steps = ModelSteps([number], torch.ones((1, 1, 4), dtype=torch.int32), *maps)
        header = recording.make_header(number, rank, 2, {"vllm_version": "x", "eplb_compile_version": "y"}, [info],
                                       final=number == last)
        in_force = None if number == 0 else (-1, torch.arange(4).view(1, 4))
        recording.write_chunk(str(record_dir), header, recording.chunk_tensors([info], [steps], [in_force]))


def test_consecutive_chunks_lost_for_one_reason_are_one_line_and_the_text_shows_the_first_lines(tmp_path, capsys):
    write_chunks(tmp_path, 0, [0, 4, 6, *range(8, 60, 2), 60], 60)  # 1-3 and 5 absent, 7 cut, then every other
    (tmp_path / "rank0" / "chunk-000007.safetensors").write_bytes(b"cut")
    write_chunks(tmp_path, 1, list(range(61)), 60)
    summary = report_json(capsys, tmp_path)
    absent = "absent (a failed flush: full disk or write error, or a deleted file)"
    damage = summary["damage"]
    assert damage[0] == (f"rank 0 chunks 1-3 lost: {absent}; their steps after 0 and before 4 and any map committed "
                         f"then are not in the recording of rank 0")
    assert damage[1] == (f"rank 0 chunk 5 lost: {absent}; its steps after 4 and before 6 and any map committed "
                         f"then are not in the recording of rank 0")
    assert damage[2].startswith(f"rank 0 chunk 7 lost: {tmp_path / 'rank0' / 'chunk-000007.safetensors'}: truncated")
    assert "its steps after 6 and before 8 and any" in damage[2]
    assert damage[3].startswith(f"rank 0 chunk 9 lost: {absent}; its steps after 8 and before 10 ")
    assert len(damage) == 3 + 26 + 1  # and the steps left out
    assert run_report(str(tmp_path)) == 0
    text = capsys.readouterr().out.splitlines()
    shown = [line.strip() for line in text if line.startswith("    rank 0 chunk")]
    assert shown == damage[:20]
    assert "    ... and 10 more (all in --json)" in text


def test_a_killed_writer_leaves_no_closing_chunk_and_the_report_says_so(tmp_path, capsys):
    make_recording(tmp_path)  # rank 1 keeps this one; rank 0 is re-recorded by a process killed mid-run
    for chunk in (tmp_path / "rank0").iterdir():
        chunk.unlink()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from tests.test_report import make_recorder
        recorder = make_recorder({str(tmp_path)!r}, 0, flush_every_steps=1)
        recorder.on_map(0, -1, torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]).expand(3, -1).clone())
        for step in (0, 1, 3):
            recorder.on_pass(0, step, torch.ones((3, 8), dtype=torch.int32))
        recorder.wait_idle()
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    summary = report_json(capsys, tmp_path)
    assert [s["step"] for s in summary["models"][0]["steps"]] == [0, 1, 3]
    assert ("rank 0: no closing chunk (the recorder was killed, or is still running): steps after 3 are not in the "
            "recording of rank 0") in summary["damage"]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs: a disk that really fills up. Needs the right to mount (root in a container may lack it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_loses_flushes_visibly_and_counts_them(small_disk, capsys, caplog):
    record_dir = small_disk / "rec"
    start_map = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1]).expand(LAYERS, -1).clone()
    passes = {step: torch.full((LAYERS, PHYSICAL), step + 1, dtype=torch.int32) for step in range(16)}
    rank1 = make_recorder(record_dir, 1, flush_every_steps=100)  # rank 1 keeps all; written last, see below
    rank1.on_map(0, -1, start_map)
    rank0 = make_recorder(record_dir, 0, flush_every_steps=1)
    rank0.on_map(0, -1, start_map)
    rank0.on_pass(0, 0, passes[0])
    rank0.wait_idle()
    stat = os.statvfs(small_disk)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize))  # the disk is now full
    with caplog.at_level(logging.WARNING):
        for step in range(1, 8):
            rank0.on_pass(0, step, passes[step])
        rank0.wait_idle()
        filler.unlink()  # space again: later flushes are written
        for step in range(8, 12):
            rank0.on_pass(0, step, passes[step])
        rank0.close()
    for step in range(12):
        rank1.on_pass(0, step, passes[step])
    rank1.close()
    assert rank0.counters == {"dropped_ring_full": 0, "dropped_write_error": 7, "write_errors": 7,
                              "paused_steps": 0}
    assert len([r for r in caplog.records if "cannot write to" in r.getMessage()]) == 1
    written = sorted(int(p.name[6:12]) for p in (record_dir / "rank0").iterdir())
    assert written == [0, *range(8, 13)]  # chunks 1-7 failed: a gap in the flush sequence
    summary = report_json(capsys, record_dir)
    assert [s["step"] for s in summary["models"][0]["steps"]] == [0, 8, 9, 10, 11]
    for s in summary["models"][0]["steps"]:
        assert s["tokens"] == 2 * passes[s["step"]].sum().item()
    damage = summary["damage"]
    assert damage[0] == ("rank 0 chunks 1-7 lost: absent (a failed flush: full disk or write error, or a deleted "
                         "file); their steps after 0 and before 8 and any map committed then are not in the "
                         "recording of rank 0")
    assert "rank 0 dropped 0 recorded steps because its ring was full and 7 in 7 failed flushes" in damage[1]
    assert summary["dropped"]["0"] == rank0.counters
    assert damage[2] == "model 'tiny': steps 1-7 left out: not recorded by every rank"


def test_drops_and_write_errors_are_metrics(tmp_path):
    prometheus_client = pytest.importorskip("prometheus_client")
    from eplb_compile.vllm_plugin.exporter import Exporter

    blocker = tmp_path / "file"
    blocker.write_text("")
    exporter = Exporter(host="127.0.0.1", port=0, ep_rank=0, ep_size=EP_SIZE)
    recorder = make_recorder(blocker / "rec", 0, flush_every_steps=2, exporter=exporter)
    exporter.add_model(INFO)
    exporter.watch(lambda: dict(recorder.counters))
    recorder.on_map(0, -1, torch.zeros((LAYERS, PHYSICAL), dtype=torch.int64))
    for step in range(5):
        recorder.on_pass(0, step, torch.ones((LAYERS, PHYSICAL), dtype=torch.int32))
    recorder.close()
    text = prometheus_client.generate_latest(exporter.registry).decode()
    exporter.close()
    assert 'eplb_compile_dropped_steps_total{rank="0",reason="write_error"} 5.0' in text
    assert 'eplb_compile_dropped_steps_total{rank="0",reason="ring_full"} 0.0' in text
    assert 'eplb_compile_write_errors_total{rank="0"} 3.0' in text  # two full flushes and the closing one
    assert 'eplb_compile_recorded_steps_total{model="tiny",rank="0"} 5.0' in text
