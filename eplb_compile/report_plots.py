"""PNG plots for ``eplb-compile report --plot DIR`` (matplotlib, imported only here), and with
``--what-if`` the predicted imbalance and switching cost of :mod:`eplb_compile.what_if`."""

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


def write_what_if_plots(what_if: dict, folder: str) -> list[str]:
    """Per model, ``model{m}_what_if.png``: :func:`what_if_figure` of ``--what-if``'s part of the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    written = []
    for index, model in enumerate(what_if["models"]):
        written.append(_save(what_if_figure(what_if, model), os.path.join(folder, f"model{index}_what_if.png")))
        plt.close("all")
    return written


def what_if_figure(what_if: dict, model: dict):
    """Top: max/mean over EP ranks per MoE layer, as recorded and as predicted under each placement.
    Bottom: per EP rank, the experts a switch to each placement receives and sends (their size in MiB on
    the right axis where the expert's bytes are known). Each bar group's label starts with the key the
    summary holds its numbers under (``recorded``, ``computed``, ``given``)."""
    import matplotlib.pyplot as plt

    layers, targets = model["layers"], ["computed"] + (["given"] if what_if["given"] else [])
    comparable = {key: model["switch"][key] for key in targets if model["switch"][key]["comparable"]}
    ep_size = len(next(iter(comparable.values()))["experts_received"]) if comparable else 0
    labels = {"recorded": "recorded", "computed": f"computed: predicted under the placement by {what_if['policy']}",
              "given": f"given: predicted under {os.path.basename(what_if['given'] or '')}"}
    figure, (imbalance, cost) = plt.subplots(2, 1, figsize=(max(8.0, 2 + 0.25 * max(len(layers), ep_size)), 8.0),
                                             gridspec_kw={"height_ratios": [3, 2]})
    keys = ["recorded", *targets]
    width = 0.8 / len(keys)
    for offset, key in enumerate(keys):
        imbalance.bar([i + (offset - (len(keys) - 1) / 2) * width for i in range(len(layers))],
                      [layer[key] for layer in layers], width, label=labels[key])
    imbalance.axhline(1.0, color="grey", linestyle=":", linewidth=1)  # perfectly balanced
    imbalance.set_ylim(0, 1.4 * max([layer[key] for layer in layers for key in keys], default=1.0))  # legend room
    imbalance.set_xticks(range(len(layers)), [layer["name"] for layer in layers], rotation=90, fontsize="small")
    imbalance.set(ylabel="max / mean EP-rank load",
                  title=f"{model['name']}: imbalance per MoE layer over {model['steps']} recorded steps")
    imbalance.legend(fontsize="small")

    groups = [(key, direction) for key in comparable for direction in ("received", "sent")]
    width = 0.8 / max(len(groups), 1)
    for offset, (key, direction) in enumerate(groups):
        cost.bar([r + (offset - (len(groups) - 1) / 2) * width for r in range(ep_size)],
                 comparable[key][f"experts_{direction}"], width, label=f"{key}: {direction}")
    notes = [f"{key}: not comparable ({model['switch'][key]['reason']})" for key in targets if key not in comparable]
    if notes:
        cost.text(0.01, 0.95, "\n".join(notes), transform=cost.transAxes, va="top", fontsize="small")
    cost.set_xticks(range(ep_size), [f"r{rank}" for rank in range(ep_size)], rotation=90 if ep_size > 24 else 0)
    cost.set_ylim(0, 1.4 * max([n for key, d in groups for n in comparable[key][f"experts_{d}"]], default=0) + 1)
    cost.set(xlabel="EP rank", ylabel="experts", title="switching from the map in force at the end: experts moved")
    if groups:
        cost.legend(fontsize="small", loc="upper right", ncol=len(groups))
    size = next((c["expert_bytes"] for c in comparable.values() if c["expert_bytes"]), None)
    if size:
        mib = size / 2**20
        cost.secondary_yaxis("right", functions=(lambda n: n * mib, lambda m: m / mib)).set_ylabel("MiB")
    return figure


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
