"""Record EPLB's per-step expert load to disk, off the forward path.

At an EPLB step whose pass goes into vLLM's window, :meth:`Recorder.on_pass`
starts an asynchronous device-to-host copy of ``expert_load_pass``
``[layers, physical]`` into a free slot of a host ring (pinned when CUDA is
available) and records a CUDA event after it; that is all the step pays. A
background thread waits on the event, takes the numbers out of the slot, feeds
the exporter, and every ``flush_every_steps`` recorded steps writes one file.
:meth:`Recorder.on_map` does the same for ``physical_to_logical_map``
whenever a rearrangement changes it.

The files' format is ``eplb_compile.recording`` (which also reads them):
one chunk per flush per rank, written atomically, each carrying the map in
force before it and numbered by a flush sequence that also counts failed
flushes. A full disk or an unwritable folder drops the recording with one
warning and counts it (``counters``: in every later chunk and in the
metrics); nothing here ever raises into the server.

Recording can be paused while serving: while a file named ``PAUSE`` exists
in ``record_dir``, recorded passes are not written (the steps counted as
``paused_steps``), maps still are, and the exporter is still fed. A file,
because vLLM's API reaches a running server's workers only through
``POST /collective_rpc``, which exists only with ``VLLM_SERVER_DEV_MODE=1``
(not for production). The writer thread looks for it at each pass, so each
rank pauses at its own step: around a switch, a few steps may be written by
some ranks only, and the report leaves them out and says so.
"""

from __future__ import annotations

import glob
import logging
import os
import queue
import threading
import time
import uuid

import torch

from eplb_compile import recording
from eplb_compile.recording import ModelInfo, ModelSteps

__all__ = ["PAUSE_FILE", "ModelInfo", "Recorder"]
_POLL_S = 50e-6
PAUSE_FILE = "PAUSE"  # in record_dir: while it exists, passes are not written


class _Slot:
    """One host copy in flight: its buffer, the event after the copy, what it is."""

    __slots__ = ("buffer", "rank_buffer", "event", "kind", "model", "step", "ring")

    def __init__(self, buffer, rank_buffer, event, kind, model, step, ring):
        self.buffer, self.rank_buffer, self.event = buffer, rank_buffer, event
        self.kind, self.model, self.step, self.ring = kind, model, step, ring


class Recorder:
    """One EP rank's recorder for every model of an ``EplbState``."""

    def __init__(self, *, record_dir: str | None, flush_every_steps: int, ring_steps: int, ep_rank: int,
                 ep_size: int, versions: dict[str, str], exporter=None, logger: logging.Logger | None = None):
        self.record_dir, self.flush_every_steps, self.ring_steps = record_dir, flush_every_steps, ring_steps
        self.ep_rank, self.ep_size, self.versions = ep_rank, ep_size, versions
        self.exporter = exporter
        self.sums_rank_load_over_ep = False  # set by the step hook: its all-reduce feeds on_pass's rank_load
        self.models: list[ModelInfo] = []
        self.map_versions: list = []  # per model, the version of its map last recorded (the step hook's)
        self.step_number = 0  # EPLB steps seen, counted by the step hook
        # Steps lost, by reason, and failed flushes; the exporter reads them, the files carry them.
        self.counters = {"dropped_ring_full": 0, "dropped_write_error": 0, "write_errors": 0, "paused_steps": 0}
        self._paused = False
        self._logger = logger or logging.getLogger(__name__)
        self._warned: set[str] = set()
        self._rings: list[tuple[torch.Tensor, torch.Tensor, queue.SimpleQueue]] = []
        self._pending: list[dict[str, list]] = []
        self._recorded_since_flush = 0
        self._chunk = 0  # the flush sequence: up at every flush, written or not, so a lost one is a gap
        self._map_in_force: list[tuple[int, torch.Tensor] | None] = []  # per model, the last map taken
        self._chunk_map_in_force: list[tuple[int, torch.Tensor] | None] = []  # ... when the pending chunk began
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._paused_step: int | None = None  # the last step counted in paused_steps (each step once)
        self.run_id = uuid.uuid4().hex  # in every chunk: a folder holding two runs' chunks is refused
        if record_dir is not None and glob.glob(os.path.join(recording.rank_dir(record_dir, ep_rank),
                                                             recording.CHUNK_GLOB)):
            # Chunk numbers restart at 0 in a new run: writing here would overwrite the earlier
            # run's files and splice the two into one recording.
            self._logger.warning("eplb_compile recorder: %s holds an earlier run's recording; not recording "
                                 "(point record_dir at a new or empty folder)",
                                 recording.rank_dir(record_dir, ep_rank))
            self.record_dir = None
        self._thread = threading.Thread(target=self._run, name="eplb_compile-recorder", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- step side

    def add_model(self, info: ModelInfo) -> int:
        """Allocate this model's ring; returns its index."""
        pin = torch.cuda.is_available()
        ring = torch.empty((self.ring_steps, len(info.layer_names), info.num_physical), dtype=torch.int32,
                           pin_memory=pin)
        rank_ring = torch.empty((self.ring_steps, len(info.layer_names), self.ep_size), dtype=torch.int64,
                                pin_memory=pin)
        free: queue.SimpleQueue = queue.SimpleQueue()
        for index in range(self.ring_steps):
            free.put(index)
        self.models.append(info)
        self._rings.append((ring, rank_ring, free))
        self._pending.append({"steps": [], "load": [], "map_steps": [], "maps": []})
        self._map_in_force.append(None)
        self._chunk_map_in_force.append(None)
        return len(self.models) - 1

    @property
    def dropped(self) -> int:
        return self.counters["dropped_ring_full"] + self.counters["dropped_write_error"]

    def on_pass(self, model: int, step: int, expert_load_pass: torch.Tensor,
                rank_load: torch.Tensor | None = None) -> None:
        """Copy one step's pass into the ring; no host sync. Drops it if the ring is full.

        ``rank_load`` ``[layers, ep_size]``: the EP-global assignments per EP rank at this
        step (the step hook's all-reduce, for the exporter); None where this rank's pass
        is the global one (EP size 1) or nothing exports.
        """
        ring, rank_ring, free = self._rings[model]
        try:
            index = free.get_nowait()
        except queue.Empty:
            self.counters["dropped_ring_full"] += 1
            self._warn_once("ring", "eplb_compile recorder: the writer thread fell %d steps behind; "
                            "dropping passes until it catches up (raise ring_steps)", self.ring_steps)
            return
        buffer, rank_buffer = ring[index], None
        buffer.copy_(expert_load_pass, non_blocking=True)
        if rank_load is not None:
            rank_buffer = rank_ring[index]
            rank_buffer.copy_(rank_load, non_blocking=True)
        self._inbox.put(_Slot(buffer, rank_buffer, _event_after_copy(expert_load_pass), "load", model, step,
                              (free, index)))

    def on_map(self, model: int, step: int, physical_to_logical_map: torch.Tensor) -> None:
        """Copy a committed map (after a rearrangement, which synchronizes anyway)."""
        pin = physical_to_logical_map.is_cuda
        buffer = torch.empty(physical_to_logical_map.shape, dtype=torch.int64, pin_memory=pin)
        buffer.copy_(physical_to_logical_map, non_blocking=True)
        self._inbox.put(_Slot(buffer, None, _event_after_copy(physical_to_logical_map), "map", model, step, None))

    def close(self) -> None:
        """Write what is pending and stop the thread (idempotent)."""
        if self._thread.is_alive():
            self._inbox.put(None)
            self._thread.join()

    def wait_idle(self) -> None:
        """Block until every queued copy has been taken in (for tests and shutdown)."""
        done = threading.Event()
        self._inbox.put(done)
        done.wait()

    # ----------------------------------------------------------------- writer side

    def _run(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                self._flush(final=True)
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            try:
                self._take(item)
            except Exception as error:  # never let a bad step kill the thread
                self._warn_once("take", "eplb_compile recorder: dropped a step: %r", error)

    def _take(self, slot: _Slot) -> None:
        while slot.event is not None and not slot.event.query():
            # Polled, not synchronize(): this thread waits, the server's streams never do,
            # and no synchronizing call exists for torch.cuda.set_sync_debug_mode to flag.
            time.sleep(_POLL_S)
        data = slot.buffer.clone()
        rank_load = None if slot.rank_buffer is None else slot.rank_buffer.clone()
        if slot.ring is not None:
            slot.ring[0].put(slot.ring[1])
        pending = self._pending[slot.model]
        if slot.kind == "map":
            pending["map_steps"].append(slot.step)
            pending["maps"].append(data)
            self._map_in_force[slot.model] = (slot.step, data)
            if self.exporter is not None:
                self.exporter.on_map(slot.model, data)
            return
        if self.exporter is not None:
            if rank_load is None:  # this rank's pass is the EP-global one
                rank_load = data.reshape(data.shape[0], self.ep_size, -1).sum(dim=-1, dtype=torch.int64)
            self.exporter.on_pass(slot.model, data, rank_load)
        if self._pause_switch():
            if slot.step != self._paused_step:  # a step, not each model's pass of it
                self._paused_step = slot.step
                self.counters["paused_steps"] += 1
            return
        pending["steps"].append(slot.step)
        pending["load"].append(data)
        self._recorded_since_flush += 1
        if self._recorded_since_flush >= self.flush_every_steps:
            self._flush()

    def _flush(self, final: bool = False) -> None:
        """Write the pending chunk (the last one, ``final``, even if empty: it says the recording closed)."""
        if self.record_dir is None or not (final or any(p["steps"] or p["map_steps"] for p in self._pending)):
            self._clear()
            return
        steps = []
        for info, pending in zip(self.models, self._pending, strict=True):
            shape = (len(info.layer_names), info.num_physical)
            steps.append(ModelSteps(pending["steps"], _stack(pending["load"], shape, torch.int32),
                                    pending["map_steps"], _stack(pending["maps"], shape, torch.int64)))
        lost = sum(len(p["steps"]) for p in self._pending)
        header = recording.make_header(self._chunk, self.ep_rank, self.ep_size, self.versions, self.models,
                                       final=final, counters=self.counters, run_id=self.run_id)
        self._chunk += 1
        try:
            recording.write_chunk(self.record_dir, header,
                                  recording.chunk_tensors(self.models, steps, self._chunk_map_in_force))
        except Exception as error:  # OSError, or safetensors' own error for a full disk
            self.counters["dropped_write_error"] += lost
            self.counters["write_errors"] += 1
            self._warn_once("write", "eplb_compile recorder: cannot write to %s (%s); recordings are dropped "
                            "until it can (this warning is not repeated)", self.record_dir, error)
        self._clear()

    def _pause_switch(self) -> bool:
        """Whether ``record_dir/PAUSE`` exists now; says each switch once in the log."""
        paused = self.record_dir is not None and os.path.exists(os.path.join(self.record_dir, PAUSE_FILE))
        if paused != self._paused:
            self._paused = paused
            if paused:
                self._flush()  # what was recorded before the pause goes to disk now, not at resume
            self._logger.info("eplb_compile recorder: rank %d %s recording (%s %s)", self.ep_rank,
                              "paused" if paused else "resumed", os.path.join(self.record_dir, PAUSE_FILE),
                              "exists" if paused else "removed")
        return paused

    def _clear(self) -> None:
        self._chunk_map_in_force = list(self._map_in_force)
        for pending in self._pending:
            for values in pending.values():
                values.clear()
        self._recorded_since_flush = 0

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._logger.warning(message, *args)


def _event_after_copy(source: torch.Tensor):
    """A CUDA event after the copy on the current stream; None on CPU (copies are done)."""
    if not source.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def _stack(items: list[torch.Tensor], shape: tuple[int, int], dtype) -> torch.Tensor:
    return torch.stack(items) if items else torch.zeros((0, *shape), dtype=dtype)
