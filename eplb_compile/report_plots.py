"""PNG plots for ``eplb-compile report --plot DIR`` (matplotlib, imported only here)."""

from __future__ import annotations

import os


def write_plots(summary: dict, folder: str) -> list[str]:
    """Per model: imbalance over steps per layer, and a layer x logical-expert heatmap."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    for index, model in enumerate(summary["models"]):
        steps = [s["step"] for s in model["steps"]]
        figure, axes = plt.subplots(figsize=(8, 4))
        for layer, name in enumerate(model["layer_names"]):
            xs, ys = with_gaps(steps, [s["max_over_mean"][layer] for s in model["steps"]])
            axes.plot(xs, ys, marker=".", label=f"L{layer} {name}")
        for change in model["rearrangements"]:
            axes.axvline(change["step"], color="grey", linestyle=":", linewidth=1)
        axes.set(xlabel="EPLB step", ylabel="max / mean EP-rank load", title=f"{model['name']}: imbalance per layer")
        if len(model["layer_names"]) <= 12:
            axes.legend(fontsize="small")
        written.append(_save(figure, os.path.join(folder, f"model{index}_imbalance.png")))

        figure, axes = plt.subplots(figsize=(8, 1 + 0.25 * len(model["layer_names"])))
        image = axes.imshow(model["logical_load"], aspect="auto", cmap="viridis", interpolation="nearest")
        axes.set(xlabel="logical expert", ylabel="layer", title=f"{model['name']}: recorded tokens per expert")
        figure.colorbar(image, ax=axes, label="tokens")
        written.append(_save(figure, os.path.join(folder, f"model{index}_heatmap.png")))
        plt.close("all")
    return written


def with_gaps(steps: list[int], values: list[float]) -> tuple[list[float], list[float]]:
    """The points with a NaN between steps that are not consecutive, so that a line stops there:
    vLLM records only the steps before a rearrangement, and a lost chunk leaves a hole."""
    xs, ys = [], []
    for i, (step, value) in enumerate(zip(steps, values, strict=True)):
        if i and step != steps[i - 1] + 1:
            xs.append(float("nan"))
            ys.append(float("nan"))
        xs.append(step)
        ys.append(value)
    return xs, ys


def _save(figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path
