"""PNG figures of expert load: imbalance over steps, and a layer x rank heatmap.

matplotlib is imported inside each function (Agg backend, no display needed)
so that ``import eplb_compile`` stays cheap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from eplb_compile.metrics import balancedness, rank_loads

# Per-lowering line styles: the first is drawn solid and wide, the others
# dashed with hollow markers on top, so identical curves visibly coincide.
_STYLES = (
    dict(linestyle="-", linewidth=2.5, alpha=0.55),
    dict(linestyle="--", linewidth=1.2, marker="o", markersize=5, markerfacecolor="none"),
    dict(linestyle=":", linewidth=1.2, marker="x", markersize=5),
)
_MAX_LABELLED_LAYERS = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_imbalance_over_steps(
    series: dict[str, torch.Tensor],
    path: str | Path,
    *,
    ylabel: str = "imbalance (max / mean tokens per rank)",
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


def plot_load_heatmap(
    window_or_pass: torch.Tensor, ep_size: int, path: str | Path, *, title: str | None = None
) -> Path:
    """Draw tokens per EP rank as a layer x rank heatmap.

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
    fig.colorbar(image, ax=ax, label="tokens")
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
    ax.set_title(title or f"Tokens per EP rank (vLLM balancedness {balancedness(window_or_pass, ep_size):.3f})")
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``eplb-compile plot``."""
    parser.add_argument(
        "load", type=Path, help="torch.save'd int tensor: [layers, physical] or [steps, layers, physical]"
    )
    parser.add_argument("--ep-size", type=int, required=True, help="number of EP ranks")
    parser.add_argument("-o", "--output", type=Path, default=Path("load_heatmap.png"), help="PNG to write")


def plot_command(args: argparse.Namespace) -> int:
    """``eplb-compile plot``: draw the heatmap of a saved load pass or window."""
    try:
        load = torch.load(args.load, map_location="cpu", weights_only=True)
    # A file that is not a torch.save archive fails in many ways (struct,
    # pickle, zip errors); all mean the same to the user.
    except Exception as error:  # noqa: BLE001
        print(f"eplb-compile plot: cannot read {args.load}: {error}", file=sys.stderr)
        return 2
    if not isinstance(load, torch.Tensor):
        print(f"eplb-compile plot: {args.load} holds a {type(load).__name__}, not a tensor", file=sys.stderr)
        return 2
    try:
        path = plot_load_heatmap(load, args.ep_size, args.output)
    except ValueError as error:
        print(f"eplb-compile plot: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def write_examples(out_dir: str | Path = "graphs", world_size: int = 4, steps: int = 40) -> bool:
    """Draw ``example_imbalance.png`` and ``example_heatmap.png`` from a gloo run.

    Runs :mod:`eplb_compile.ep_simulation` on ``world_size`` CPU ranks (256
    tokens per rank, window 8, record gate off at steps 10-13) and plots the
    all-reduced window of both lowerings. Returns whether they agreed.
    """
    from eplb_compile.ep_simulation import SimConfig, run_spawned, verify
    from eplb_compile.metrics import imbalance_max_over_mean

    cfg = SimConfig(steps=steps, gate_off_steps=tuple(range(10, 14)), max_tokens=256, window_size=8)
    results = run_spawned(cfg, world_size)
    windows = {name: results[0][f"{name}_windows"] for name in ("topk", "counts")}
    series = {
        f"{name} path": torch.stack([imbalance_max_over_mean(window, world_size) for window in per_step])
        for name, per_step in windows.items()
    }
    out_dir = Path(out_dir)
    plot_imbalance_over_steps(
        series, out_dir / "example_imbalance.png",
        title=f"Window imbalance per layer, {world_size} gloo ranks (record gate off at steps 10-13)",
    )
    plot_load_heatmap(windows["counts"][-1], world_size, out_dir / "example_heatmap.png")
    return not verify(cfg, world_size, results)


if __name__ == "__main__":
    # python -m eplb_compile.plots [OUT_DIR]: regenerate graphs/example_*.png.
    raise SystemExit(0 if write_examples(*sys.argv[1:2]) else 1)
