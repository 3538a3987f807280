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
    """Recorded steps per file written."""
    ring_steps: int = 16
    """Host slots for passes copied from the device but not yet read by the writer thread."""
    metrics_port: int | None = None
    """Prometheus port of EP rank 0; rank r serves on ``metrics_port + r``. None: no exporter."""
    metrics_host: str = "127.0.0.1"
    """Address the exporter binds (loopback unless changed)."""
    initial_placement: str | None = None
    """A placement file (``eplb-compile place``) every EP rank applies before serving. None: vLLM's own."""
    online_rebalancing: bool = True
    """False: vLLM's periodic rearrangements are skipped (the load is still counted and recorded)."""

    @property
    def enabled(self) -> bool:
        return self.record_dir is not None or self.metrics_port is not None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_CHECKS = {
    "record_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a non-empty string or null"),
    "flush_every_steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "ring_steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "metrics_port": (lambda v: v is None or (_is_int(v) and 0 < v < 65536), "an integer port in 1..65535 or null"),
    "metrics_host": (lambda v: isinstance(v, str) and v != "", "a non-empty host string"),
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
