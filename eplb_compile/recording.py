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
and version, the recorder run's id (``run_id``; absent in older files), chunk
sequence number, whether it is the recorder's last (``final``), EP rank and
size, the recorder's counters (steps dropped because the ring was full or a
flush failed, failed flushes) as of this flush, the vLLM and eplb_compile
versions, and per model a ``ModelInfo`` (name, layer
names, logical and physical expert counts, EPLB window size). Reading needs
safetensors, not vLLM and not a GPU. The header also holds a CRC-32 per
tensor and one of itself (``header_crc32``; older files have none), so flipped
bytes are found, not read as load or as another run's header.

It runs past 300 lines on purpose: the writer and the reader's checks of one
layout stay side by side, so a format change is made in one file.

Reading is numpy's, never torch's (``eplb-compile report`` must not pay
torch's import): ``read_chunk`` reads and checks one file; ``read_recording``
reads a folder around damaged or missing chunks, states each loss (which rank,
which chunk, which steps and maps) in ``Recording.damage``, and sums the ranks.
The folder reader is its own module, ``recording_reader.py``, for length
only: it knows the layout through this module's chunk reader and checks, so
this module stays the format's one owner. The writer takes host torch tensors
or numpy arrays; the reader gives numpy arrays. It runs a little past 300
lines because the writer and the chunk checks must change together.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

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
    load: np.ndarray  # [steps, layers, physical] (a torch tensor too, on the writer's side)
    map_steps: list[int]
    maps: np.ndarray  # [maps, layers, physical]


def rank_dir(record_dir: str, ep_rank: int) -> str:
    return os.path.join(record_dir, f"rank{ep_rank}")


# ----------------------------------------------------------------------- writing


def make_header(chunk: int, ep_rank: int, ep_size: int, versions: dict[str, str], models: list[ModelInfo],
                *, final: bool = False, counters: dict[str, int] | None = None,
                run_id: str | None = None) -> dict:
    """``run_id``: one value per recorder run, so that two runs written into one folder are told apart."""
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "chunk": chunk, "final": final, "ep_rank": ep_rank,
            "ep_size": ep_size, "run_id": run_id, "counters": dict(counters or {}), **versions,
            "models": [asdict(m) for m in models]}


def chunk_tensors(models: list[ModelInfo], pending: list[ModelSteps],
                  maps_in_force: list[tuple[int, object] | None] | None = None) -> dict[str, np.ndarray]:
    """The tensors of one chunk: per model its steps, loads, map steps and maps, and the map in force before it.

    Loads and maps may be host torch tensors (the recorder's) or numpy arrays.
    """
    tensors = {}
    maps_in_force = maps_in_force or [None] * len(models)
    for model, (info, steps, in_force) in enumerate(zip(models, pending, maps_in_force, strict=True)):
        shape = (len(info.layer_names), info.num_physical)
        tensors[f"model{model}.steps"] = np.asarray(steps.steps, dtype=np.int64)
        tensors[f"model{model}.load"] = _host_array(steps.load, np.int32)
        tensors[f"model{model}.map_steps"] = np.asarray(steps.map_steps, dtype=np.int64)
        tensors[f"model{model}.maps"] = _host_array(steps.maps, np.int64)
        tensors[f"model{model}.map_in_force_step"] = np.asarray([] if in_force is None else [in_force[0]],
                                                                dtype=np.int64)
        tensors[f"model{model}.map_in_force"] = (np.zeros((0, *shape), dtype=np.int64) if in_force is None else
                                                 _host_array(in_force[1], np.int64).reshape(1, *shape))
    return tensors


def write_chunk(record_dir: str, header: dict, tensors: dict[str, np.ndarray]) -> str:
    """Write one chunk under its rank's folder, atomically (temporary name, then rename); its path.

    Raises OSError (or safetensors' own error, for a full disk) when it cannot.
    """
    from safetensors.numpy import save_file

    folder = rank_dir(record_dir, header["ep_rank"])
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, f"chunk-{header['chunk']:06d}.safetensors")
    temporary = final + ".tmp"
    header = {**header, "crc32": {name: _crc32(tensor) for name, tensor in tensors.items()}}
    header["header_crc32"] = _header_crc32(json.loads(json.dumps(header)))  # of what the reader will parse
    try:
        save_file(tensors, temporary, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)
    return final


def _host_array(values, dtype=None) -> np.ndarray:
    """A C-ordered numpy array from a numpy array or a host torch tensor (through its ``.numpy()``)."""
    if not isinstance(values, np.ndarray):
        values = values.numpy()
    return np.ascontiguousarray(values, dtype=dtype)


def _header_crc32(header: dict) -> int:
    """Of the header but its checksums, as canonical JSON: a flipped byte in a layer name or a counter is found."""
    checked = {key: value for key, value in header.items() if key not in ("crc32", "header_crc32")}
    return zlib.crc32(json.dumps(checked, sort_keys=True).encode())


def _crc32(tensor) -> int:
    """Of the tensor's bytes as stored (C order, little-endian); a torch tensor or numpy array."""
    array = _host_array(tensor)
    return zlib.crc32(memoryview(array).cast("B")) if array.size else 0


# ----------------------------------------------------------------------- reading one chunk


@dataclass
class Recording:
    path: str
    ep_size: int
    header: dict  # the lowest rank's first readable chunk's
    models: list[tuple[dict, ModelSteps]]  # per model: its info (as in the header), steps summed over ranks
    steps_missing_on_some_rank: int
    damage: list[str] = field(default_factory=list)  # one line per loss, empty for an intact recording
    dropped: dict[int, dict[str, int]] = field(default_factory=dict)  # per rank: its last readable chunk's counters


def read_chunk(file: str, *, with_loads: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """One file's header and tensors, checked; RecordingError if it is not a chunk of a known version,
    DamagedChunk if it is one that cannot be used. Without loads (the ``.load`` tensors, read by
    ``read_load`` then), their dtype and shape are checked, their values are not."""
    from safetensors import safe_open

    try:
        with safe_open(file, "np") as handle:
            metadata = handle.metadata() or {}
            layouts = {key: (_dtype_name(handle.get_slice(key).get_dtype()), tuple(handle.get_slice(key).get_shape()))
                       for key in handle.keys()}
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if with_loads or not _is_load(key)}
    except Exception as error:  # safetensors raises its own error type for a cut file
        raise DamagedChunk(f"{file}: truncated or corrupt ({str(error).splitlines()[0]})") from None
    if HEADER_KEY not in metadata:
        raise RecordingError(f"{file}: not a recording (no {HEADER_KEY!r} header)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except ValueError:
        raise RecordingError(f"{file}: not a recording (its {HEADER_KEY!r} header is not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise RecordingError(f"{file}: not a recording (format {header.get('format') if isinstance(header, dict) else header!r})")
    if header.get("version") != FORMAT_VERSION:
        raise RecordingError(f"{file}: unknown format version {header.get('version')!r} "
                             f"(this eplb_compile reads version {FORMAT_VERSION})")
    if "header_crc32" in header and header["header_crc32"] != _header_crc32(header):  # older files have none
        raise DamagedChunk(f"{file}: malformed chunk (its header fails its checksum)")
    problem = _chunk_problem(header, tensors, layouts)
    if problem:
        raise DamagedChunk(f"{file}: malformed chunk ({problem})")
    return header, tensors


def _is_load(name: str) -> bool:
    return name.endswith(".load")


def _dtype_name(code: str) -> str:
    """safetensors' dtype code as numpy names it: ``I32`` -> ``int32``."""
    kind = {"I": "int", "U": "uint", "F": "float"}.get(code[:1])
    return f"{kind}{code[1:]}" if kind and code[1:].isdigit() else code.lower()


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _chunk_problem(header: dict, tensors: dict[str, np.ndarray], layouts: dict[str, tuple]) -> str | None:
    """What is wrong with a chunk of the right format and version, or None; ``layouts``: every
    tensor's (dtype, shape), ``tensors``: those read (all, or all but the loads)."""
    for key, low in (("chunk", 0), ("ep_size", 1), ("ep_rank", 0)):
        if not _is_int(header.get(key), low):
            return f"header {key!r} is {header.get(key)!r}"
    if header["ep_rank"] >= header["ep_size"]:
        return f"ep_rank {header['ep_rank']} >= ep_size {header['ep_size']}"
    checksums = header.get("crc32")
    if not isinstance(checksums, dict) or set(checksums) != set(layouts):
        return "tensor checksums missing"
    for name, tensor in tensors.items():
        if checksums[name] != _crc32(tensor):
            return f"{name} fails its checksum"
    models = header.get("models")
    if not isinstance(models, list) or not models:
        return "header 'models' missing"
    for index, info in enumerate(models):
        problem = _model_problem(index, info, header["ep_size"], tensors, layouts)
        if problem:
            return problem
    return None


def _model_problem(index: int, info, ep_size: int, tensors: dict[str, np.ndarray],
                   layouts: dict[str, tuple]) -> str | None:
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
    expected = {"steps": ("int64", 1), "load": ("int32", 3), "map_steps": ("int64", 1),
                "maps": ("int64", 3), "map_in_force_step": ("int64", 1), "map_in_force": ("int64", 3)}
    for name, (dtype, dims) in expected.items():
        if prefix + name not in layouts:
            return f"no tensor {prefix + name}"
        found, found_shape = layouts[prefix + name]
        if found != dtype or len(found_shape) != dims:
            return f"{prefix + name} is {found} {found_shape}, not {dims}-D {dtype}"
    steps, load_shape = tensors[prefix + "steps"], layouts[prefix + "load"][1]
    if load_shape != (len(steps), *shape):
        return f"{prefix}load is {load_shape}, not {(len(steps), *shape)}"
    if len(steps) and (int(steps.min()) < 0 or bool((steps[1:] <= steps[:-1]).any())):
        return f"{prefix}steps are not increasing step numbers"
    if prefix + "load" in tensors and _negative(prefix + "load", tensors[prefix + "load"]):
        return _negative(prefix + "load", tensors[prefix + "load"])
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


def _negative(name: str, load: np.ndarray) -> str | None:
    return f"{name} has negative counts" if load.size and int(load.min()) < 0 else None


def read_load(file: str, header: dict, model: int, shape: tuple) -> tuple[np.ndarray | None, str | None]:
    """One model's load of a chunk ``read_chunk`` read without loads, and what is wrong with it (or None):
    the checks it was spared then (its checksum, no negative count); no load if the file can no longer be
    read (deleted or cut since its header was read)."""
    from safetensors import safe_open

    name = f"model{model}.load"
    try:
        with safe_open(file, "np") as handle:
            load = handle.get_tensor(name)
    except Exception as error:  # changed since its header was read
        return None, f"unreadable on the second read ({str(error).splitlines()[0]})"
    if load.dtype != np.int32 or load.shape != shape:
        return load, f"{name} changed since its header was read"
    return load, f"{name} fails its checksum" if header["crc32"][name] != _crc32(load) else _negative(name, load)


def read_recording(path: str, steps: tuple[int | None, int | None] = (None, None)) -> Recording:
    """Every rank's chunks, the passes summed over ranks at the steps every rank recorded, of those
    ``first <= step < last`` (:func:`eplb_compile.recording_reader.read_recording`)."""
    from eplb_compile.recording_reader import read_recording as read_folder

    return read_folder(path, steps)


def concat_chunks(chunks: list[tuple[dict, dict]], model: int) -> ModelSteps:
    """One rank's chunks, in chunk order, for one model; maps from every chunk (in force or committed), by step."""
    steps, loads, maps = [], [], {}
    for _, tensors in sorted(chunks, key=lambda chunk: chunk[0]["chunk"]):
        steps += tensors[f"model{model}.steps"].tolist()
        if f"model{model}.load" in tensors:  # read_recording reads loads only when it sums them
            loads.append(tensors[f"model{model}.load"])
        for kind in ("map_in_force", "maps"):
            step_key = "map_in_force_step" if kind == "map_in_force" else "map_steps"
            for step, routing in zip(tensors[f"model{model}.{step_key}"].tolist(), tensors[f"model{model}.{kind}"]):
                maps.setdefault(step, routing)
    map_steps = sorted(maps)
    shape = next(iter(chunks))[1][f"model{model}.maps"].shape[1:]
    stacked = np.stack([maps[s] for s in map_steps]) if maps else np.zeros((0, *shape), dtype=np.int64)
    return ModelSteps(steps, np.concatenate(loads) if loads else np.zeros((0, *shape), dtype=np.int32),
                      map_steps, stacked)
