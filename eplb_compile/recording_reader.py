"""Reading a recording's folder: every rank's chunks, read around losses, summed over ranks.

Part of the recording format of :mod:`eplb_compile.recording`, which owns the
layout (this module reads files only through its ``read_chunk``,
``read_load`` and ``concat_chunks``) and whose ``read_recording`` calls
this one; a module of its own for length only.

Two passes, numpy only: every chunk's header and small tensors first (steps,
maps; each checked and CRC-checked), to decide which steps every rank
recorded, which map routed each, and what is lost; then each chunk's loads,
read once, CRC-checked, checked for negative counts and summed into one
``[steps, layers, physical]`` int64 buffer per model, one chunk's load in
memory at a time. A chunk whose loads fail that check is read around like any
damaged chunk: the first pass's decisions are made again without it (and the
loads read again), so the result is the one a reader that checked everything
first would give; so is one deleted or cut between the two passes. A file that is no chunk of this version (its header
unparseable, or of another version) among readable chunks is a damaged chunk
too: one flipped byte must not stop the report; only a folder with no readable
chunk is refused for it.
"""

from __future__ import annotations

import bisect
import glob
import os
import re

import numpy as np

from eplb_compile.recording import (CHUNK_GLOB, DamagedChunk, ModelSteps, Recording, RecordingError, concat_chunks,
                                    read_chunk, read_load)

_RANK_DIR = re.compile(r"rank(\d+)$")
_CHUNK_FILE = re.compile(r"chunk-(\d+)\.safetensors$")


def read_recording(path: str, steps: tuple[int | None, int | None] = (None, None)) -> Recording:
    """Every rank's chunks, the passes summed over ranks at the steps every rank recorded.

    ``steps``: only the steps ``first <= step < last`` (None: open) are summed, so memory follows
    the range; maps, damage and the count of steps left out stay those of the whole recording.
    Damaged or missing chunks are read around and said in ``damage``; RecordingError
    (one line) for a folder that is not a recording, or one with nothing usable.
    """
    if not os.path.isdir(path):
        raise RecordingError(f"{path}: not a recording (no such folder)")
    files = sorted(glob.glob(os.path.join(path, "rank*", CHUNK_GLOB)))
    if not files:
        raise RecordingError(f"{path}: not a recording (no rank*/{CHUNK_GLOB} files)")
    chunks: dict[int, dict[int, tuple[dict, dict]]] = {}  # their loads left out: read once, when summed
    chunk_files: dict[int, dict[int, str]] = {}
    unreadable: dict[int, dict[int, str]] = {}
    not_chunks: dict[tuple[int, int], str] = {}  # (rank, number): why the file is no chunk this reader knows
    for file in files:
        rank_match = _RANK_DIR.search(os.path.dirname(file))
        chunk_match = _CHUNK_FILE.search(os.path.basename(file))
        if not rank_match or not chunk_match:
            continue  # not a name the recorder writes
        rank, number = int(rank_match.group(1)), int(chunk_match.group(1))
        try:
            header, tensors = read_chunk(file, with_loads=False)
        except DamagedChunk as error:
            unreadable.setdefault(rank, {})[number] = str(error)
            continue
        except RecordingError as error:  # no header, or a version unknown here: a flipped byte, or no recording
            not_chunks[rank, number] = str(error)
            continue
        if (header["ep_rank"], header["chunk"]) != (rank, number):
            unreadable.setdefault(rank, {})[number] = f"{file}: malformed chunk (its header says rank " \
                                                      f"{header['ep_rank']} chunk {header['chunk']})"
            continue
        chunks.setdefault(rank, {})[number] = (header, tensors)
        chunk_files.setdefault(rank, {})[number] = file
    if not_chunks and not chunks:  # nothing readable: the folder is not a recording (of this version)
        raise RecordingError(not_chunks[min(not_chunks)])
    for (rank, number), why in not_chunks.items():  # among readable chunks: a damaged one
        unreadable.setdefault(rank, {})[number] = why
    for rank in sorted(chunks):
        _check_one_run(path, rank, chunks[rank])
    while True:  # once, unless a chunk's loads fail their check: then again without it
        recording = _plan(path, chunks, unreadable, steps)
        failed = _sum_loads(recording, chunks, chunk_files)
        if not failed:
            return recording
        for (rank, number), why in failed.items():
            del chunks[rank][number]
            unreadable.setdefault(rank, {})[number] = why
            if not chunks[rank]:
                del chunks[rank]


def _check_one_run(path: str, rank: int, chunks: dict[int, tuple[dict, dict]]) -> None:
    """RecordingError unless one rank's readable chunks are of one recorder run: one ``run_id`` (None, in
    older files, counts as one) and no step in two chunks. A restarted server recording into the same folder
    numbers its chunks from 0 again and overwrites some: summing such a folder would count steps twice."""
    run_ids = {header.get("run_id") for header, _ in chunks.values()}
    if len(run_ids) > 1:
        raise RecordingError(f"{path}: rank{rank} holds chunks of {len(run_ids)} runs "
                             f"({', '.join(sorted(map(str, run_ids)))}); record each run into its own folder")
    seen: dict[tuple[str, int], int] = {}  # (steps tensor, step) -> the chunk holding it
    for number, (_, tensors) in sorted(chunks.items()):
        for key, steps in tensors.items():
            if not key.endswith(".steps"):
                continue
            for step in steps.tolist():
                if (key, step) in seen:
                    raise RecordingError(f"{path}: rank{rank} chunks {seen[key, step]} and {number} both hold step "
                                         f"{step} ({key}): two runs in one folder? record each run into its own "
                                         f"folder")
                seen[key, step] = number


def _plan(path: str, chunks: dict, unreadable: dict, step_range: tuple[int | None, int | None]) -> Recording:
    """The recording the readable chunks make, its loads still zero: which steps (of ``step_range``),
    maps and losses."""
    first, last = step_range
    if not chunks:
        lowest = min(unreadable, default=None)  # the lowest rank's lowest chunk (not the alphabetically first)
        first = unreadable[lowest][min(unreadable[lowest])] if unreadable else \
            "no file named rank<r>/chunk-<n>.safetensors"
        raise RecordingError(f"{path}: no readable chunk; first: {first}")
    header = chunks[min(chunks)][min(chunks[min(chunks)])][0]
    ep_size = header["ep_size"]
    for rank, by_number in chunks.items():
        for number, (other, _) in by_number.items():
            if (other["ep_size"], other["models"]) != (ep_size, header["models"]):
                raise RecordingError(f"{path}: rank{rank}/chunk-{number:06d} is of another run (EP size or models "
                                     f"differ from the first chunk's)")
    if sorted(chunks) != list(range(ep_size)):
        raise RecordingError(f"{path}: ranks {sorted(chunks)} recorded, but ep_size is {ep_size}"
                             + (f" (unreadable: {sorted(set(unreadable) - set(chunks))})"
                                if set(unreadable) - set(chunks) else ""))
    damage = [line for rank in range(ep_size)
              for line in _rank_damage(rank, chunks[rank], unreadable.get(rank, {}))]
    dropped = {rank: chunks[rank][max(chunks[rank])][0].get("counters", {}) for rank in range(ep_size)}
    models, missing = [], 0
    for index, info in enumerate(header["models"]):
        per_rank = [concat_chunks(list(chunks[rank].values()), index) for rank in range(ep_size)]
        maps = _agreed_maps(path, info["name"], per_rank)
        common = sorted(set.intersection(*(set(rank.steps) for rank in per_rank)))
        left_out = sorted(set.union(*(set(rank.steps) for rank in per_rank)) - set(common))
        missing += len(left_out)
        if left_out:
            damage.append(f"model {info['name']!r}: steps {_ranges(left_out)} left out: not recorded by every rank")
        unrouted = [step for step in common if not any(s < step for s in maps)]
        if unrouted:  # no chunk says which map routed them: never guess one
            damage.append(f"model {info['name']!r}: steps {_ranges(unrouted)} left out: the map that routed them "
                          f"is in no readable chunk")
            unrouted_set = set(unrouted)
            common = [step for step in common if step not in unrouted_set]
        common = [step for step in common if (first is None or step >= first) and (last is None or step < last)]
        load = np.zeros((len(common), len(info["layer_names"]), info["num_physical"]), dtype=np.int64)
        map_steps = sorted(maps)
        stacked = np.stack([maps[s] for s in map_steps]) if maps else per_rank[0].maps
        models.append((info, ModelSteps(common, load, map_steps, stacked)))
    return Recording(path, ep_size, header, models, missing, damage, dropped)


def _sum_loads(recording: Recording, chunks: dict, files: dict) -> dict[tuple[int, int], str]:
    """Read every chunk's loads once, check them and add the planned steps' rows into ``recording``'s
    buffers, one chunk's load in memory at a time; the chunks whose loads fail, with why (then the
    sums are incomplete and the plan is made again without them)."""
    rows_of = [{step: row for row, step in enumerate(steps.steps)} for _, steps in recording.models]
    failed = {}
    for rank in sorted(chunks):
        for number, (header, tensors) in sorted(chunks[rank].items()):
            file = files[rank][number]
            for model, ((_, summed), row_of) in enumerate(zip(recording.models, rows_of, strict=True)):
                steps = tensors[f"model{model}.steps"].tolist()
                load, problem = read_load(file, header, model, (len(steps), *summed.load.shape[1:]))
                if problem:
                    failed[rank, number] = f"{file}: " + (problem if load is None else f"malformed chunk ({problem})")
                    break
                if not failed:
                    _add_rows(summed.load, load, steps, row_of)
    return failed


def _add_rows(total: np.ndarray, load: np.ndarray, steps: list[int], row_of: dict[int, int]) -> None:
    """``total[row_of[step]] += load[i]`` for each of the chunk's steps that is planned."""
    picks = [(i, row_of[step]) for i, step in enumerate(steps) if step in row_of]
    if not picks:
        return
    first, rows = picks[0][1], [row for _, row in picks]
    if len(picks) == len(steps) and rows == list(range(first, first + len(rows))):
        total[first:first + len(rows)] += load  # the usual case: every step, in order: no copy
    else:
        total[rows] += load[[i for i, _ in picks]]


def _agreed_maps(path: str, name: str, per_rank: list[ModelSteps]) -> dict[int, np.ndarray]:
    """Every rank's maps by step (the ranks share them: one rank's lost chunk is another's copy)."""
    maps: dict[int, np.ndarray] = {}
    for rank, steps in enumerate(per_rank):
        for step, routing in zip(steps.map_steps, steps.maps, strict=True):
            if step in maps and not np.array_equal(maps[step], routing):
                raise RecordingError(f"{path}: rank {rank}'s map of model {name!r} at step {step} differs "
                                     f"from another rank's")
            maps.setdefault(step, routing)
    return maps


def _rank_damage(rank: int, chunks: dict[int, tuple[dict, dict]], unreadable: dict[int, str]) -> list[str]:
    """One line per run of consecutive chunks of this rank that are missing or unusable for one reason, and
    for a recording that did not close. Linear in the chunks: a long outage loses thousands."""
    numbers = sorted(chunks)
    bounds = {}  # chunk number -> its (lowest, highest) step, over its models; chunks without steps left out
    for number in numbers:
        steps = [t for key, t in chunks[number][1].items() if key.endswith(".steps") and len(t)]
        if steps:
            bounds[number] = (min(int(t.min()) for t in steps), max(int(t.max()) for t in steps))
    highest_up_to, highest = [], None  # highest_up_to[i]: the highest step of numbers[:i + 1]
    for number in numbers:
        if number in bounds:
            highest = bounds[number][1] if highest is None else max(highest, bounds[number][1])
        highest_up_to.append(highest)
    lowest_from, lowest = [None] * len(numbers), None  # lowest_from[i]: the lowest step of numbers[i:]
    for i in range(len(numbers) - 1, -1, -1):
        if numbers[i] in bounds:
            lowest = bounds[numbers[i]][0] if lowest is None else min(lowest, bounds[numbers[i]][0])
        lowest_from[i] = lowest
    lines = []
    last = max([*chunks, *unreadable])
    lost = [n for n in range(last + 1) if n not in chunks]
    absent = "absent (a failed flush: full disk or write error, or a deleted file)"
    i = 0
    while i < len(lost):  # a run: consecutive numbers lost for one reason (no readable chunk between them)
        first, why = lost[i], unreadable.get(lost[i], absent)
        while i + 1 < len(lost) and lost[i + 1] == lost[i] + 1 and unreadable.get(lost[i + 1], absent) == why:
            i += 1
        end, i = lost[i], i + 1
        at = bisect.bisect_left(numbers, first)  # the readable chunks before it: numbers[:at]
        before = highest_up_to[at - 1] if at else None
        after = lowest_from[at] if at < len(numbers) else None
        span = " and ".join(([f"after {before}"] if before is not None else [])
                            + ([f"before {after}"] if after is not None else []))
        span = f"steps {span}" if span else "steps"
        what = f"chunk {first} lost: {why}; its" if first == end else f"chunks {first}-{end} lost: {why}; their"
        lines.append(f"rank {rank} {what} {span} and any map committed then are not in the recording of rank {rank}")
    if not chunks[max(chunks)][0].get("final") and last == max(chunks):
        lines.append(f"rank {rank}: no closing chunk (the recorder was killed, or is still running): steps after "
                     f"{highest_up_to[-1] if highest_up_to[-1] is not None else 'the start'} are not in the "
                     f"recording of rank {rank}")
    counters = chunks[max(chunks)][0].get("counters", {})
    if any(counters.get(key) for key in ("dropped_ring_full", "dropped_write_error", "write_errors")):
        lines.append(f"rank {rank} dropped {counters.get('dropped_ring_full', 0)} recorded steps because its ring was "
                     f"full and {counters.get('dropped_write_error', 0)} in {counters.get('write_errors', 0)} failed "
                     f"flushes (as of its last readable chunk)")
    return lines


def _ranges(steps: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3, 7``."""
    parts, start = [], None
    for i, step in enumerate(steps):
        if start is None:
            start = step
        if i + 1 == len(steps) or steps[i + 1] != step + 1:
            parts.append(str(start) if start == step else f"{start}-{step}")
            start = None
    return ", ".join(parts)
