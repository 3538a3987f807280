"""The recording format: the one module that writes and reads the recorder's files.

The vLLM plugin's recorder (``vllm_plugin/recorder.py``) writes with
``write_chunk``; ``eplb-compile report`` (``report.py``) reads with
``read_recording``. Neither knows the layout below; a change of it is a new
``FORMAT_VERSION`` here, and the reader refuses a version it does not know.

Version 2: ``record_dir/rank{r}/`` holds ``chunk-{n:06d}.safetensors`` files,
each written to a temporary name and renamed, so a killed server loses at
most the steps since the last flush. ``n`` is the flush sequence: it goes up
at every flush, written or not, so a flush lost to a full disk, a killed
writer or a deleted file shows as a gap. Per model ``m`` (vLLM's main model
is 0, a drafter 1):

- ``model{m}.steps`` int64 ``[n]``: EPLB step numbers (counted from 0 on every rank alike);
- ``model{m}.load`` int32 ``[n, layers, physical]``: this rank's pass at those
  steps, in assignments (one per token and top-k slot);
- ``model{m}.map_steps`` int64 ``[k]`` and ``model{m}.maps`` int64 ``[k, layers, physical]``:
  ``physical_to_logical_map`` as committed at those steps (``START_UP_STEP``
  for the one at start-up); a pass at step s was routed with the last map of
  a step < s;
- ``model{m}.map_in_force_step`` ``[j]`` and ``model{m}.map_in_force`` ``[j, layers, physical]``
  (j = 1, or 0 before the start-up map): the map committed last before this
  chunk, so that every chunk says alone which map routed each of its passes.

The safetensors metadata key ``HEADER_KEY`` holds a JSON header: format name
and version, chunk sequence number, whether it is the recorder's last
(``final``), EP rank and size, the recorder's counters (steps dropped because
the ring was full or a flush failed, failed flushes) as of this flush, the
vLLM and eplb_compile versions, and per model a ``ModelInfo`` (name, layer
names, logical and physical expert counts, EPLB window size). Reading needs
safetensors, not vLLM and not a GPU. The header also holds a CRC-32 per
tensor, so flipped bytes are found, not read as load.

``read_recording`` reads a folder around damaged or missing chunks and states
each loss (which rank, which chunk, which steps and maps) in
``Recording.damage``. This module is longer than most (about 420 lines) because
the writer and that reader must change together.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, field

import torch

FORMAT_NAME = "eplb_compile.recording"
FORMAT_VERSION = 2
HEADER_KEY = "eplb_compile"
CHUNK_GLOB = "chunk-*.safetensors"
START_UP_STEP = -1  # the map_steps entry of the map in force before the first step


class RecordingError(ValueError):
    """The folder is not a readable recording; the message is one line."""


class DamagedChunk(RecordingError):
    """One chunk cannot be used (cut, corrupt, malformed); a recording is read around it."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    layer_names: list[str]
    num_logical: int
    num_physical: int
    window_size: int


@dataclass
class ModelSteps:
    """One model's recorded steps and maps, one rank's or summed over ranks."""

    steps: list[int]
    load: torch.Tensor  # [steps, layers, physical]
    map_steps: list[int]
    maps: torch.Tensor  # [maps, layers, physical]


def rank_dir(record_dir: str, ep_rank: int) -> str:
    return os.path.join(record_dir, f"rank{ep_rank}")


# ----------------------------------------------------------------------- writing


def make_header(chunk: int, ep_rank: int, ep_size: int, versions: dict[str, str], models: list[ModelInfo],
                *, final: bool = False, counters: dict[str, int] | None = None) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "chunk": chunk, "final": final, "ep_rank": ep_rank,
            "ep_size": ep_size, "counters": dict(counters or {}), **versions,
            "models": [asdict(m) for m in models]}


def chunk_tensors(models: list[ModelInfo], pending: list[ModelSteps],
                  maps_in_force: list[tuple[int, torch.Tensor] | None] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one chunk: per model its steps, loads, map steps and maps, and the map in force before it."""
    tensors = {}
    maps_in_force = maps_in_force or [None] * len(models)
    for model, (info, steps, in_force) in enumerate(zip(models, pending, maps_in_force, strict=True)):
        tensors[f"model{model}.steps"] = torch.tensor(steps.steps, dtype=torch.int64)
        tensors[f"model{model}.load"] = steps.load.to(torch.int32)
        tensors[f"model{model}.map_steps"] = torch.tensor(steps.map_steps, dtype=torch.int64)
        tensors[f"model{model}.maps"] = steps.maps.to(torch.int64)
        shape = (len(info.layer_names), info.num_physical)
        tensors[f"model{model}.map_in_force_step"] = torch.tensor([] if in_force is None else [in_force[0]],
                                                                  dtype=torch.int64)
        tensors[f"model{model}.map_in_force"] = (torch.zeros((0, *shape), dtype=torch.int64) if in_force is None
                                                 else in_force[1].to(torch.int64).reshape(1, *shape))
    return tensors


def write_chunk(record_dir: str, header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """Write one chunk under its rank's folder, atomically (temporary name, then rename); its path.

    Raises OSError (or safetensors' own error, for a full disk) when it cannot.
    """
    from safetensors.torch import save_file

    folder = rank_dir(record_dir, header["ep_rank"])
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"chunk-{header['chunk']:06d}.safetensors")
    temporary = final + ".tmp"
    header = {**header, "crc32": {name: _crc32(tensor) for name, tensor in tensors.items()}}
    try:
        save_file(tensors, temporary, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)
    return final


def _crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().numpy().tobytes()) if tensor.numel() else 0


# ----------------------------------------------------------------------- reading


@dataclass
class Recording:
    path: str
    ep_size: int
    header: dict  # the lowest rank's first readable chunk's
    models: list[tuple[dict, ModelSteps]]  # per model: its info (as in the header), steps summed over ranks
    steps_missing_on_some_rank: int
    damage: list[str] = field(default_factory=list)  # one line per loss, empty for an intact recording
    dropped: dict[int, dict[str, int]] = field(default_factory=dict)  # per rank: its last readable chunk's counters


def read_chunk(file: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One file's header and tensors, checked; RecordingError if it is not a chunk of a known version,
    DamagedChunk if it is one that cannot be used."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a cut file
        raise DamagedChunk(f"{file}: truncated or corrupt ({str(error).splitlines()[0]})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, ValueError):
        raise RecordingError(f"{file}: not a recording (no {HEADER_KEY!r} header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise RecordingError(f"{file}: not a recording (format {header.get('format') if isinstance(header, dict) else header!r})")
    if header.get("version") != FORMAT_VERSION:
        raise RecordingError(f"{file}: unknown format version {header.get('version')!r} "
                             f"(this eplb_compile reads version {FORMAT_VERSION})")
    problem = _chunk_problem(header, tensors)
    if problem:
        raise DamagedChunk(f"{file}: malformed chunk ({problem})")
    return header, tensors


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _chunk_problem(header: dict, tensors: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a chunk of the right format and version, or None."""
    for key, low in (("chunk", 0), ("ep_size", 1), ("ep_rank", 0)):
        if not _is_int(header.get(key), low):
            return f"header {key!r} is {header.get(key)!r}"
    if header["ep_rank"] >= header["ep_size"]:
        return f"ep_rank {header['ep_rank']} >= ep_size {header['ep_size']}"
    checksums = header.get("crc32")
    if not isinstance(checksums, dict) or set(checksums) != set(tensors):
        return "tensor checksums missing"
    for name, tensor in tensors.items():
        if checksums[name] != _crc32(tensor):
            return f"{name} fails its checksum"
    models = header.get("models")
    if not isinstance(models, list) or not models:
        return "header 'models' missing"
    for index, info in enumerate(models):
        problem = _model_problem(index, info, header["ep_size"], tensors)
        if problem:
            return problem
    return None


def _model_problem(index: int, info, ep_size: int, tensors: dict[str, torch.Tensor]) -> str | None:
    if not isinstance(info, dict) or set(info) != {f for f in ModelInfo.__dataclass_fields__}:
        return f"model {index}'s description is not {sorted(ModelInfo.__dataclass_fields__)}"
    names = info["layer_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        return f"model {index}: layer_names {names!r}"
    for key in ("num_logical", "num_physical", "window_size"):
        if not _is_int(info[key], 1):
            return f"model {index}: {key} {info[key]!r}"
    if info["num_physical"] % ep_size:
        return f"model {index}: {info['num_physical']} physical experts do not split over {ep_size} EP ranks"
    shape = (len(names), info["num_physical"])
    prefix = f"model{index}."
    expected = {"steps": (torch.int64, 1), "load": (torch.int32, 3), "map_steps": (torch.int64, 1),
                "maps": (torch.int64, 3), "map_in_force_step": (torch.int64, 1), "map_in_force": (torch.int64, 3)}
    for name, (dtype, dims) in expected.items():
        tensor = tensors.get(prefix + name)
        if tensor is None:
            return f"no tensor {prefix + name}"
        if tensor.dtype != dtype or tensor.dim() != dims:
            return f"{prefix + name} is {tensor.dtype} {tuple(tensor.shape)}, not {dims}-D {dtype}"
    steps, load = tensors[prefix + "steps"], tensors[prefix + "load"]
    if tuple(load.shape) != (len(steps), *shape):
        return f"{prefix}load is {tuple(load.shape)}, not {(len(steps), *shape)}"
    if len(steps) and (int(steps.min()) < 0 or bool((steps[1:] <= steps[:-1]).any())):
        return f"{prefix}steps are not increasing step numbers"
    if bool((load < 0).any()):
        return f"{prefix}load has negative counts"
    for maps, map_steps in (("maps", "map_steps"), ("map_in_force", "map_in_force_step")):
        m, ms = tensors[prefix + maps], tensors[prefix + map_steps]
        if tuple(m.shape) != (len(ms), *shape):
            return f"{prefix}{maps} is {tuple(m.shape)}, not {(len(ms), *shape)}"
        if len(m) and (int(m.min()) < -1 or int(m.max()) >= info["num_logical"]):
            return f"{prefix}{maps} names a logical expert outside 0..{info['num_logical'] - 1}"
        if len(ms) and int(ms.min()) < START_UP_STEP:
            return f"{prefix}{map_steps} below {START_UP_STEP}"
    if len(tensors[prefix + "map_in_force"]) > 1:
        return f"{prefix}map_in_force holds more than one map"
    return None


def concat_chunks(chunks: list[tuple[dict, dict]], model: int) -> ModelSteps:
    """One rank's chunks, in chunk order, for one model; maps from every chunk (in force or committed), by step."""
    steps, loads, maps = [], [], {}
    for _, tensors in sorted(chunks, key=lambda chunk: chunk[0]["chunk"]):
        steps += tensors[f"model{model}.steps"].tolist()
        if f"model{model}.load" in tensors:  # read_recording drops loads until it sums them
            loads.append(tensors[f"model{model}.load"])
        for kind in ("map_in_force", "maps"):
            step_key = "map_in_force_step" if kind == "map_in_force" else "map_steps"
            for step, routing in zip(tensors[f"model{model}.{step_key}"].tolist(), tensors[f"model{model}.{kind}"]):
                maps.setdefault(step, routing)
    map_steps = sorted(maps)
    shape = next(iter(chunks))[1][f"model{model}.maps"].shape[1:]
    stacked = torch.stack([maps[s] for s in map_steps]) if maps else torch.zeros((0, *shape), dtype=torch.int64)
    return ModelSteps(steps, torch.cat(loads) if loads else torch.zeros((0, *shape), dtype=torch.int32),
                      map_steps, stacked)


_RANK_DIR = re.compile(r"rank(\d+)$")
_CHUNK_FILE = re.compile(r"chunk-(\d+)\.safetensors$")


def read_recording(path: str) -> Recording:
    """Every rank's chunks, the passes summed over ranks at the steps every rank recorded.

    Damaged or missing chunks are read around and said in ``damage``; RecordingError
    (one line) for a folder that is not a recording, or one with nothing usable.
    """
    if not os.path.isdir(path):
        raise RecordingError(f"{path}: not a recording (no such folder)")
    files = sorted(glob.glob(os.path.join(path, "rank*", CHUNK_GLOB)))
    if not files:
        raise RecordingError(f"{path}: not a recording (no rank*/{CHUNK_GLOB} files)")
    chunks: dict[int, dict[int, tuple[dict, dict]]] = {}  # their loads left out: read again when summed
    chunk_files: dict[int, dict[int, str]] = {}
    unreadable: dict[int, dict[int, str]] = {}
    for file in files:
        rank_match = _RANK_DIR.search(os.path.dirname(file))
        chunk_match = _CHUNK_FILE.search(os.path.basename(file))
        if not rank_match or not chunk_match:
            continue  # not a name the recorder writes
        rank, number = int(rank_match.group(1)), int(chunk_match.group(1))
        try:
            header, tensors = read_chunk(file)
        except DamagedChunk as error:
            unreadable.setdefault(rank, {})[number] = str(error)
            continue
        if (header["ep_rank"], header["chunk"]) != (rank, number):
            unreadable.setdefault(rank, {})[number] = f"{file}: malformed chunk (its header says rank " \
                                                      f"{header['ep_rank']} chunk {header['chunk']})"
            continue
        chunks.setdefault(rank, {})[number] = (header, {k: v for k, v in tensors.items() if not k.endswith(".load")})
        chunk_files.setdefault(rank, {})[number] = file
    if not chunks:
        first = next((why for by_number in unreadable.values() for why in by_number.values()),
                     "no file named rank<r>/chunk-<n>.safetensors")
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
            common = [step for step in common if step not in unrouted]
        load = _sum_over_ranks(chunks, chunk_files, index, common,
                               (len(common), len(info["layer_names"]), info["num_physical"]))
        map_steps = sorted(maps)
        stacked = torch.stack([maps[s] for s in map_steps]) if maps else per_rank[0].maps
        models.append((info, ModelSteps(common, load, map_steps, stacked)))
    return Recording(path, ep_size, header, models, missing, damage, dropped)


def _sum_over_ranks(chunks: dict, files: dict, model: int, common: list[int], shape: tuple) -> torch.Tensor:
    """The passes at ``common`` steps summed over ranks, one chunk's load in memory at a time."""
    from safetensors import safe_open

    row_of = {step: row for row, step in enumerate(common)}
    load = torch.zeros(shape, dtype=torch.int64)
    for rank in sorted(chunks):
        for number, (_, tensors) in sorted(chunks[rank].items()):
            pick = [(i, row_of[step]) for i, step in enumerate(tensors[f"model{model}.steps"].tolist())
                    if step in row_of]
            if not pick:
                continue
            try:
                with safe_open(files[rank][number], "pt") as handle:
                    chunk_load = handle.get_tensor(f"model{model}.load")
            except Exception as error:  # changed since it was checked
                raise RecordingError(f"{files[rank][number]}: unreadable on the second read "
                                     f"({str(error).splitlines()[0]})") from None
            rows = torch.tensor([row for _, row in pick])
            load.index_add_(0, rows, chunk_load[[i for i, _ in pick]].to(torch.int64))
    return load


def _agreed_maps(path: str, name: str, per_rank: list[ModelSteps]) -> dict[int, torch.Tensor]:
    """Every rank's maps by step (the ranks share them: one rank's lost chunk is another's copy)."""
    maps: dict[int, torch.Tensor] = {}
    for rank, steps in enumerate(per_rank):
        for step, routing in zip(steps.map_steps, steps.maps, strict=True):
            if step in maps and not torch.equal(maps[step], routing):
                raise RecordingError(f"{path}: rank {rank}'s map of model {name!r} at step {step} differs "
                                     f"from another rank's")
            maps.setdefault(step, routing)
    return maps


def _rank_damage(rank: int, chunks: dict[int, tuple[dict, dict]], unreadable: dict[int, str]) -> list[str]:
    """One line per chunk of this rank that is missing or unusable, and for a recording that did not close."""
    def steps_of(number: int) -> list[int]:
        tensors = chunks[number][1]
        return sorted(s for key, t in tensors.items() if key.endswith(".steps") for s in t.tolist())

    lines = []
    last = max([*chunks, *unreadable])
    for number in range(last + 1):
        if number in chunks:
            continue
        before = [s for n in chunks if n < number for s in steps_of(n)]
        after = [s for n in chunks if n > number for s in steps_of(n)]
        bounds = ([f"after {max(before)}"] if before else []) + ([f"before {min(after)}"] if after else [])
        span = " ".join(["steps", " and ".join(bounds)]).strip()
        why = unreadable.get(number, "absent (a failed flush: full disk or write error, or a deleted file)")
        lines.append(f"rank {rank} chunk {number} lost: {why}; its {span} and any map committed then are not "
                     f"in the recording of rank {rank}")
    if not chunks[max(chunks)][0].get("final") and last == max(chunks):
        recorded = [s for n in chunks for s in steps_of(n)]
        lines.append(f"rank {rank}: no closing chunk (the recorder was killed, or is still running): steps after "
                     f"{max(recorded) if recorded else 'the start'} are not in the recording of rank {rank}")
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
