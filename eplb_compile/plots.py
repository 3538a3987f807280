"""PNG figures of expert load: imbalance over steps, and a layer x rank heatmap.

matplotlib is an optional dependency (``pip install 'eplb-compile[plot]'``),
imported inside each function (Agg backend, no display needed), so that
``import eplb_compile`` stays cheap and a serving install does without it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from eplb_compile.metrics import balancedness, imbalance_max_over_mean, rank_loads

# Per-lowering line styles: the first is drawn solid and wide, the others
# dashed with hollow markers on top, so identical curves visibly coincide.
_STYLES = (
    dict(linestyle="-", linewidth=2.5, alpha=0.55),
    dict(linestyle="--", linewidth=1.2, marker="o", markersize=5, markerfacecolor="none"),
    dict(linestyle=":", linewidth=1.2, marker="x", markersize=5),
)
_MAX_LABELLED_LAYERS = 10


PLOT_EXTRA_HINT = "pip install 'eplb-compile[plot]'"


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(f"plotting needs matplotlib: {PLOT_EXTRA_HINT}") from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def imbalance_series(loads: dict[str, torch.Tensor], ep_size: int) -> dict[str, torch.Tensor]:
    """Per-step, per-layer max/mean imbalance of ``[steps, layers, physical]`` loads.

    A layer with nothing recorded in a step (the record gate was off, or no
    tokens came) is NaN, so its line stops there: the metric would call an
    empty load balanced (1.0), which a plot would show as a perfect step.
    """
    series = {}
    for name, per_step in loads.items():
        values = torch.stack([imbalance_max_over_mean(step, ep_size) for step in per_step])
        empty = per_step.sum(dim=-1) == 0  # [steps, layers]
        series[name] = values.masked_fill(empty, float("nan"))
    return series


def plot_imbalance_over_steps(
    series: dict[str, torch.Tensor],
    path: str | Path,
    *,
    ylabel: str = "imbalance (max / mean assignments per rank)",
    title: str = "Per-layer load imbalance over steps",
) -> Path:
    """Draw per-layer imbalance over steps, one curve style per lowering.

    Args:
        series: lowering name -> ``[steps, layers]`` imbalance values, e.g.
            :func:`eplb_compile.metrics.imbalance_max_over_mean` of each step's
            window, stacked.
        path: where to write the PNG.
    """
    if not series:
        raise ValueError("series is empty: nothing to plot")
    if len(series) > len(_STYLES):
        raise ValueError(f"at most {len(_STYLES)} series can be told apart, got {len(series)}")
    for name, values in series.items():
        if values.dim() != 2:
            raise ValueError(f"series {name!r} must be [steps, layers], got shape {tuple(values.shape)}")
    plt = _pyplot()
    from matplotlib.lines import Line2D

    num_layers = max(values.shape[1] for values in series.values())
    if num_layers <= 10:
        colors = plt.get_cmap("tab10")
    else:
        cmap = plt.get_cmap("viridis")
        colors = lambda layer: cmap(layer / (num_layers - 1))  # noqa: E731
    fig, ax = plt.subplots(figsize=(9, 5))
    for style, (name, values) in zip(_STYLES, series.items()):
        values = values.detach().to(torch.float64).cpu()
        steps = range(values.shape[0])
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer].tolist(), color=colors(layer), **style)
    # Two legends: which colour is which layer, which style is which lowering.
    style_handles = [Line2D([], [], color="black", **style) for style in _STYLES[: len(series)]]
    # Both legends sit outside the axes, so they never hide a curve.
    first = ax.legend(style_handles, list(series), title="lowering", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if num_layers <= _MAX_LABELLED_LAYERS:
        ax.add_artist(first)
        layer_handles = [Line2D([], [], color=colors(layer), linewidth=2.5) for layer in range(num_layers)]
        ax.legend(layer_handles, [f"layer {i}" for i in range(num_layers)], title="layer",
                  loc="lower left", bbox_to_anchor=(1.01, 0.0))
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    path = Path(path)
    # The tight box ignores a legend added with add_artist unless named here.
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=[first])
    plt.close(fig)
    return path


def heatmap_title(window_or_pass: torch.Tensor, ep_size: int) -> str:
    return f"Assignments per EP rank (vLLM balancedness {balancedness(window_or_pass, ep_size):.3f})"


def plot_load_heatmap(
    window_or_pass: torch.Tensor, ep_size: int, path: str | Path, *, title: str | None = None
) -> Path:
    """Draw assignments (token x top-k slot) per EP rank as a layer x rank heatmap.

    Args:
        window_or_pass: ``[layers, physical]`` pass or ``[steps, layers, physical]``
            window (summed over steps).
        ep_size: EP ranks; rank r owns physical experts ``[r*P/ep_size, (r+1)*P/ep_size)``.
        path: where to write the PNG.
    """
    per_rank = rank_loads(window_or_pass, ep_size)
    num_layers = per_rank.shape[0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.0 + 0.7 * ep_size), max(3.0, 1.5 + 0.35 * num_layers)))
    image = ax.imshow(per_rank.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="assignments (tokens x top-k)")
    # Numbers in the cells only while they stay legible.
    if num_layers * ep_size <= 256:
        threshold = (per_rank.max() + per_rank.min()) / 2
        for layer in range(num_layers):
            for rank in range(ep_size):
                value = per_rank[layer, rank]
                ax.text(rank, layer, f"{int(value)}", ha="center", va="center", fontsize=8,
                        color="black" if value > threshold else "white")
    ax.set_xticks(range(ep_size))
    if num_layers <= 64:
        ax.set_yticks(range(num_layers))
    ax.set_xlabel("EP rank")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or heatmap_title(window_or_pass, ep_size))
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


EXAMPLE_DATA = "example_figures.json"


def example_figure_data(windows: dict[str, torch.Tensor], ep_size: int, title: str) -> dict:
    """The numbers the example figures draw (written beside them, so a test can see them drift)."""
    series = imbalance_series({f"{name} path": per_step for name, per_step in windows.items()}, ep_size)
    last = list(windows.values())[-1][-1]
    return {
        "imbalance_title": title,
        "heatmap_title": heatmap_title(last, ep_size),
        "ep_size": ep_size,
        "imbalance": {name: [[round(float(v), 6) for v in step] for step in values] for name, values in series.items()},
        "assignments_per_rank": rank_loads(last, ep_size).long().tolist(),
    }


def write_example_figures(
    windows: dict[str, torch.Tensor], ep_size: int, out_dir: str | Path, *, title: str
) -> list[Path]:
    """``example_imbalance.png``, ``example_heatmap.png`` and the numbers behind them
    (``example_figures.json``) from each lowering's windows.

    Args:
        windows: lowering name -> ``[steps, layers, physical]`` all-reduced
            window total after each step (as ``ep_simulation.run_rank`` returns).
        ep_size: EP ranks of the run.
        out_dir: an existing directory.
        title: of the imbalance figure.
    """
    import json

    series = imbalance_series({f"{name} path": per_step for name, per_step in windows.items()}, ep_size)
    out_dir = Path(out_dir)
    last = list(windows.values())[-1][-1]
    data = out_dir / EXAMPLE_DATA
    data.write_text(json.dumps(example_figure_data(windows, ep_size, title)) + "\n")
    return [
        plot_imbalance_over_steps(series, out_dir / "example_imbalance.png", title=title),
        plot_load_heatmap(last, ep_size, out_dir / "example_heatmap.png"),
        data,
    ]
