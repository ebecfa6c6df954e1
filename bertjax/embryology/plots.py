"""The embryology plots, drawn from the long table (embryology.csv's rows) alone.

  pos_prediction.png, pos_reconstruction.png   one panel per UPOS tag: accuracy against the step
  probes_TASK.png                               probe accuracy (and selectivity) by layer x step, a heatmap per group
  cka.png                                       CKA with the final and with the previous step, layer x step
  downstream.png                                fine-tuned dev metrics against the step

Steps are on a symmetric-log axis (linear below 1), so step 0, the initialisation, sits beside the
log-spaced kept steps. Several runs are overlaid by group (runs that differ only in seed): the
group's mean as a line and the range over its seeds as a band.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw(rows: Sequence[dict], groups: dict[str, list[str]], out: pathlib.Path) -> list[str]:
    """Every plot the rows allow; returns the paths written."""
    measures = {row["measure"] for row in rows}
    written = []
    for measure in ("prediction", "reconstruction"):
        if measure in measures:
            written.append(_pos_curves(rows, groups, measure, out / f"pos_{measure}.png"))
    for task in sorted(m.split(":", 1)[1] for m in measures if m.startswith("probe:")):
        panels = [m for m in (f"probe:{task}", f"selectivity:{task}") if m in measures]
        written.append(_heatmaps(rows, groups, panels, out / f"probes_{task}.png"))
    cka_panels = [m for m in ("cka_final", "cka_previous") if m in measures]
    if cka_panels:
        written.append(_heatmaps(rows, groups, cka_panels, out / "cka.png"))
    downstream = sorted(m for m in measures if m.startswith("downstream:"))
    if downstream:
        written.append(_downstream(rows, groups, downstream, out / "downstream.png"))
    return [str(path) for path in written]


def _series(rows, members, measure, layer, label) -> tuple[list[int], np.ndarray]:
    """Steps every member has, and a [members, steps] array of the cell's values."""
    per_run = {member: {} for member in members}
    for row in rows:
        if row["run"] in per_run and row["measure"] == measure and row["layer"] == layer and row["label"] == label:
            per_run[row["run"]][row["step"]] = row["value"]
    present = [curve for curve in per_run.values() if curve]
    if not present:
        return [], np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(curve) for curve in present)))
    return steps, np.array([[curve[step] for step in steps] for curve in present], dtype=float)


def _overlay(axis, rows, groups, measure, layer, label) -> None:
    for index, (group, members) in enumerate(groups.items()):
        steps, values = _series(rows, members, measure, layer, label)
        if not steps:
            continue
        color = f"C{index}"
        axis.plot(steps, values.mean(axis=0), color=color, marker="." if len(steps) < 40 else None, label=group)
        if len(values) > 1:
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=color, alpha=0.25, linewidth=0)
    axis.set_xscale("symlog", linthresh=1)


def _pos_curves(rows, groups, measure, path) -> pathlib.Path:
    counts = {}
    for row in rows:
        if row["measure"] == measure and row["label"] not in counts:
            counts[row["label"]] = row["n"] or 0
    labels = ["ALL"] + sorted((label for label in counts if label != "ALL"), key=lambda label: -counts[label])
    labels = [label for label in labels if label in counts]
    columns = 5
    lines = math.ceil(len(labels) / columns)
    plt = _pyplot()
    figure, axes = plt.subplots(lines, columns, figsize=(3.2 * columns, 2.6 * lines), squeeze=False, sharex=True, sharey=True)
    for axis, label in zip(axes.flat, labels):
        _overlay(axis, rows, groups, measure, None, label)
        axis.set_title(f"{label} ({counts[label]} words)", fontsize=9)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(labels) :]:
        axis.axis("off")
    # One scale for every tag (shared y), from 0 to the highest accuracy any tag reaches.
    top = max(axis.dataLim.ymax for axis in list(axes.flat)[: len(labels)])
    axes.flat[0].set_ylim(0, max(top, 0.01) * 1.05)
    axes.flat[0].legend(fontsize=7)
    band = " (band: range over seeds)" if any(len(members) > 1 for members in groups.values()) else ""
    figure.suptitle(f"{measure} accuracy by UPOS tag against the pretraining step{band}")
    figure.supxlabel("step (symlog)")
    figure.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.92, hspace=0.35, wspace=0.08)  # tight_layout is slow on 20 panels
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _heatmaps(rows, groups, measures, path) -> pathlib.Path:
    """One heatmap (layer x step, the group's mean over seeds) per measure and group."""
    plt = _pyplot()
    figure, axes = plt.subplots(len(measures), len(groups), figsize=(1.0 + 5.0 * len(groups), 0.8 + 2.4 * len(measures)), squeeze=False)
    for line, measure in enumerate(measures):
        for column, (group, members) in enumerate(groups.items()):
            axis = axes[line][column]
            layers = sorted({(row["layer"], row["label"]) for row in rows if row["measure"] == measure and row["run"] in members and row["layer"] is not None})
            cells = [_series(rows, members, measure, layer, label) for layer, label in layers]
            steps = sorted(set.intersection(*(set(steps) for steps, _ in cells))) if cells else []
            if not steps:
                axis.axis("off")
                continue
            grid = np.array([[values.mean(axis=0)[cell_steps.index(step)] for step in steps] for cell_steps, values in cells])
            image = axis.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
            axis.set_yticks(range(len(layers)), [str(layer) for layer, _ in layers])
            ticks = range(0, len(steps), max(1, len(steps) // 10))
            axis.set_xticks(list(ticks), [str(steps[tick]) for tick in ticks], fontsize=7)
            axis.set(title=f"{measure} · {group}", xlabel="step (kept checkpoints)", ylabel="layer (0 = embeddings)")
            figure.colorbar(image, ax=axis)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def _downstream(rows, groups, measures, path) -> pathlib.Path:
    panels = sorted({(row["measure"], row["label"]) for row in rows if row["measure"] in measures})
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for axis, (measure, label) in zip(axes[0], panels):
        _overlay(axis, rows, groups, measure, None, label)
        axis.set(title=f"{measure} {label}", xlabel="pretraining step (symlog)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
