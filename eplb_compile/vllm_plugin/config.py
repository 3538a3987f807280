"""The plugin's settings in vLLM's ``additional_config``, validated at start-up.

Switched on with ``--additional-config '{"eplb_compile": {...}}'``; absent,
nothing is recorded or exported. Every key is checked when vLLM builds the
EPLB state (model load), so a typo fails the start-up with the key's name
instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SECTION = "eplb_compile"


@dataclasses.dataclass(frozen=True)
class ObservabilityConfig:
    record_dir: str | None = None
    """Folder of the recording; each EP rank writes ``record_dir/rank{r}/``. None: no recording."""
    flush_every_steps: int = 100
    """Recorded steps per file written (1..MAX_FLUSH_EVERY_STEPS)."""
    ring_steps: int = 16
    """Host slots for passes copied from the device but not yet read by the writer thread (1..MAX_RING_STEPS)."""
    metrics_port: int | None = None
    """Prometheus port of EP rank 0; rank r serves on ``metrics_port + r``. None: no exporter."""
    metrics_host: str = "127.0.0.1"
    """Address the exporter binds (loopback unless changed)."""
    per_expert_metrics: bool = False
    """Also export one series per layer, logical expert and rank (many: see the plugin README)."""
    initial_placement: str | None = None
    """A placement file (``eplb-compile place``) every EP rank applies before serving. None: vLLM's own."""
    online_rebalancing: bool = True
    """False: vLLM's periodic rearrangements are skipped (the load is still counted and recorded)."""

    @property
    def enabled(self) -> bool:
        return self.record_dir is not None or self.metrics_port is not None


# Sane maxima: a flush holds that many passes in memory (58 x 288 int32 is 67 KB each), a ring
# slot is pinned host memory of the same size.
MAX_FLUSH_EVERY_STEPS = 100_000
MAX_RING_STEPS = 4096
MAX_PORT = 65535


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "record_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a non-empty string or null"),
    "flush_every_steps": (lambda v: _is_int(v) and 1 <= v <= MAX_FLUSH_EVERY_STEPS,
                          f"an integer in 1..{MAX_FLUSH_EVERY_STEPS}"),
    "ring_steps": (lambda v: _is_int(v) and 1 <= v <= MAX_RING_STEPS, f"an integer in 1..{MAX_RING_STEPS}"),
    "metrics_port": (lambda v: v is None or (_is_int(v) and 1 <= v <= MAX_PORT),
                     f"an integer port in 1..{MAX_PORT} or null"),
    "metrics_host": (lambda v: isinstance(v, str) and v != "", "a non-empty host string"),
    "per_expert_metrics": (lambda v: isinstance(v, bool), "true or false"),
    "initial_placement": (lambda v: v is None or (isinstance(v, str) and v != ""), "a non-empty path or null"),
    "online_rebalancing": (lambda v: isinstance(v, bool), "true or false"),
}
assert set(_CHECKS) == {f.name for f in dataclasses.fields(ObservabilityConfig)}


def from_additional_config(additional_config: Mapping | None) -> ObservabilityConfig:
    """Parse ``additional_config["eplb_compile"]``; raise ValueError naming a bad key."""
    section = (additional_config or {}).get(SECTION)
    if section is None:
        return ObservabilityConfig()
    where = f"additional_config[{SECTION!r}]"
    if not isinstance(section, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(section).__name__}")
    unknown = sorted(set(section) - set(_CHECKS))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; known keys: {sorted(_CHECKS)}")
    for key, value in section.items():
        check, expected = _CHECKS[key]
        if not check(value):
            raise ValueError(f"{where}[{key!r}] must be {expected}, got {value!r}")
    return ObservabilityConfig(**section)


def check_ports(config: ObservabilityConfig, ep_size: int) -> None:
    """EP rank r serves on ``metrics_port + r``: the last rank's port must exist too."""
    if config.metrics_port is not None and config.metrics_port + ep_size - 1 > MAX_PORT:
        raise ValueError(f"additional_config[{SECTION!r}]['metrics_port'] = {config.metrics_port}: EP rank r serves "
                         f"on metrics_port + r, and {ep_size} EP ranks need ports up to "
                         f"{config.metrics_port + ep_size - 1} > {MAX_PORT}")
