"""The committed example figures (graphs/example_*.png) are what ``eplb-compile examples`` draws today.

``examples`` writes the numbers behind its figures to ``example_figures.json``
beside the PNGs; this recomputes them from the simulation's reference (which
``examples`` proves equal to what its gloo ranks record) and compares. When
the simulation or the metrics change, this fails until the figures are
regenerated with ``eplb-compile examples --out graphs``.
"""

from __future__ import annotations

import json
from pathlib import Path

from eplb_compile.ep_simulation import EXAMPLE_CONFIG, example_title, reference_passes, reference_windows
from eplb_compile.plots import EXAMPLE_DATA, example_figure_data

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"


def test_committed_example_figures_are_current():
    committed = json.loads((GRAPHS / EXAMPLE_DATA).read_text())
    ranks = committed["ep_size"]
    windows = reference_windows(reference_passes(EXAMPLE_CONFIG, ranks), EXAMPLE_CONFIG.window_size)
    now = example_figure_data({"topk": windows, "counts": windows}, ranks, example_title(EXAMPLE_CONFIG, ranks))
    assert committed == json.loads(json.dumps(now)), "regenerate: eplb-compile examples --out graphs"
    assert (GRAPHS / "example_imbalance.png").is_file() and (GRAPHS / "example_heatmap.png").is_file()
