"""The recording format: the one module that writes and reads the recorder's files.

The vLLM plugin's recorder (``vllm_plugin/recorder.py``) writes with
``write_chunk``; ``eplb-compile report`` (``report.py``) reads with
``read_recording``. Neither knows the layout below; a change of it is a new
``FORMAT_VERSION`` here, and the reader refuses a version it does not know.

Version 1: ``record_dir/rank{r}/`` holds ``chunk-{n:06d}.safetensors`` files,
each written to a temporary name and renamed, so a killed server loses at
most the steps since the last flush. Per model ``m`` (vLLM's main model is 0,
a drafter 1):

- ``model{m}.steps`` int64 ``[n]``: EPLB step numbers (counted from 0 on every rank alike);
- ``model{m}.load`` int32 ``[n, layers, physical]``: this rank's pass at those
  steps, in assignments (one per token and top-k slot);
- ``model{m}.map_steps`` int64 ``[k]`` and ``model{m}.maps`` int64 ``[k, layers, physical]``:
  ``physical_to_logical_map`` as committed at those steps (``START_UP_STEP``
  for the one at start-up); a pass at step s was routed with the last map of
  a step < s.

The safetensors metadata key ``HEADER_KEY`` holds a JSON header: format name
and version, chunk number, EP rank and size, the vLLM and eplb_compile
versions, and per model a ``ModelInfo`` (name, layer names, logical and
physical expert counts, EPLB window size). Reading needs safetensors, not
vLLM and not a GPU.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import asdict, dataclass

import torch

FORMAT_NAME = "eplb_compile.recording"
FORMAT_VERSION = 1
HEADER_KEY = "eplb_compile"
CHUNK_GLOB = "chunk-*.safetensors"
START_UP_STEP = -1  # the map_steps entry of the map in force before the first step


class RecordingError(ValueError):
    """The folder is not a readable recording; the message is one line."""


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


def make_header(chunk: int, ep_rank: int, ep_size: int, versions: dict[str, str], models: list[ModelInfo]) -> dict:
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "chunk": chunk, "ep_rank": ep_rank,
            "ep_size": ep_size, **versions, "models": [asdict(m) for m in models]}


def chunk_tensors(models: list[ModelInfo], pending: list[ModelSteps]) -> dict[str, torch.Tensor]:
    """The tensors of one chunk: per model its steps, loads, map steps and maps."""
    tensors = {}
    for model, (info, steps) in enumerate(zip(models, pending, strict=True)):
        tensors[f"model{model}.steps"] = torch.tensor(steps.steps, dtype=torch.int64)
        tensors[f"model{model}.load"] = steps.load.to(torch.int32)
        tensors[f"model{model}.map_steps"] = torch.tensor(steps.map_steps, dtype=torch.int64)
        tensors[f"model{model}.maps"] = steps.maps.to(torch.int64)
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
    try:
        save_file(tensors, temporary, metadata={HEADER_KEY: json.dumps(header)})
        os.replace(temporary, final)
    finally:
        with contextlib.suppress(OSError):
            os.remove(temporary)
    return final


# ----------------------------------------------------------------------- reading


@dataclass
class Recording:
    path: str
    ep_size: int
    header: dict  # the lowest rank's first chunk's
    models: list[tuple[dict, ModelSteps]]  # per model: its info (as in the header), steps summed over ranks
    steps_missing_on_some_rank: int


def read_chunk(file: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """One file's header and tensors; RecordingError if it is not a readable chunk of a known version."""
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error type for a cut file
        raise RecordingError(f"{file}: truncated or corrupt ({str(error).splitlines()[0]})") from None
    try:
        header = json.loads(metadata[HEADER_KEY])
    except (KeyError, ValueError):
        raise RecordingError(f"{file}: not a recording (no {HEADER_KEY!r} header)") from None
    if header.get("format") != FORMAT_NAME:
        raise RecordingError(f"{file}: not a recording (format {header.get('format')!r})")
    if header.get("version") != FORMAT_VERSION:
        raise RecordingError(f"{file}: unknown format version {header.get('version')!r} "
                             f"(this eplb_compile reads version {FORMAT_VERSION})")
    return header, tensors


def concat_chunks(chunks: list[tuple[dict, dict]], model: int) -> ModelSteps:
    """One rank's chunks, in chunk order, for one model."""
    steps, loads, map_steps, maps = [], [], [], []
    for _, tensors in sorted(chunks, key=lambda chunk: chunk[0]["chunk"]):
        steps += tensors[f"model{model}.steps"].tolist()
        loads.append(tensors[f"model{model}.load"])
        map_steps += tensors[f"model{model}.map_steps"].tolist()
        maps.append(tensors[f"model{model}.maps"])
    return ModelSteps(steps, torch.cat(loads), map_steps, torch.cat(maps))


def read_recording(path: str) -> Recording:
    """Every rank's chunks, the passes summed over ranks at the steps every rank recorded.

    RecordingError (one line) for a folder that is not a complete recording.
    """
    if not os.path.isdir(path):
        raise RecordingError(f"{path}: not a recording (no such folder)")
    files = sorted(glob.glob(os.path.join(path, "rank*", CHUNK_GLOB)))
    if not files:
        raise RecordingError(f"{path}: not a recording (no rank*/{CHUNK_GLOB} files)")
    chunks: dict[int, list[tuple[dict, dict]]] = {}
    for file in files:
        header, tensors = read_chunk(file)
        chunks.setdefault(header["ep_rank"], []).append((header, tensors))
    header = chunks[min(chunks)][0][0]
    ep_size = header["ep_size"]
    if sorted(chunks) != list(range(ep_size)):
        raise RecordingError(f"{path}: ranks {sorted(chunks)} recorded, but ep_size is {ep_size}")
    models, missing = [], 0
    for index, info in enumerate(header["models"]):
        per_rank = [concat_chunks(chunks[rank], index) for rank in range(ep_size)]
        common = sorted(set.intersection(*(set(rank.steps) for rank in per_rank)))
        missing += max(len(rank.steps) for rank in per_rank) - len(common)
        load = torch.zeros((len(common), len(info["layer_names"]), info["num_physical"]), dtype=torch.int64)
        for rank in per_rank:
            position = {step: row for row, step in enumerate(rank.steps)}
            for row, step in enumerate(common):
                load[row] += rank.load[position[step]]
        first = per_rank[0]
        if START_UP_STEP not in first.map_steps:
            raise RecordingError(f"{path}: rank 0 has no start-up map for model {info['name']!r} (first chunk missing)")
        models.append((info, ModelSteps(common, load, first.map_steps, first.maps)))
    return Recording(path, ep_size, header, models, missing)
