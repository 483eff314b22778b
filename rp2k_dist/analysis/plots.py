"""The figures of a run's report, drawn in memory as PNG bytes: training curves, per-category
accuracy bars and example thumbnails of confused pairs."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import run_folder, storage
from ..data.manifest import Manifest
from ..evaluation.metrics import AccuracyTable
from . import iter_shard_images
from .figures import MAX_VERTICAL_BARS, bar_chart_height, bar_panel, bars_shown, class_label, short
from .fonts import figure_text, readable_fonts

from .run import Run


DPI = 100



def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_bytes(figure: Any, path: str | Path | None = None) -> bytes:
    """A Matplotlib figure as PNG bytes, also written to ``path`` (a local path or a URI) if given."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        storage.write_bytes(path, data)
    return data


@readable_fonts
def plot_curves(metrics: list[dict[str, Any]], path: str | Path | None = None) -> bytes:
    """Training loss and top-1 (train, val; val top-5 dashed) per epoch, as PNG bytes
    (written to ``path`` too if given)."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(11, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    def series(axes, key: str, label: str, style: str = "-o") -> None:
        points = [(m["epoch"], m[key]) for m in metrics if key in m]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=4)

    series(loss_axes, "train_loss", "train")
    series(accuracy_axes, "train_top1", "train top-1")
    series(accuracy_axes, "val_top1", "val top-1")
    series(accuracy_axes, "val_top5", "val top-5", "--s")
    loss_axes.set(title="training loss", xlabel="epoch", ylabel="loss")
    accuracy_axes.set(title="accuracy", xlabel="epoch", ylabel="%", ylim=(0, 100))
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return png_bytes(figure, path)


@readable_fonts
def plot_categories(table: AccuracyTable, path: str | Path | None = None,
                    paper: dict[str, tuple[float, float]] | None = None) -> bytes:
    """Top-1 and top-5 per meta-category (type | shape), paper top-1 as black ticks, as PNG
    bytes (written to ``path`` too if given).
    Side by side for a few categories; for many, one horizontal sorted panel per system,
    stacked (:func:`rp2k_dist.analysis.figures.bar_panel`)."""
    systems = [("type", table.by_type), ("shape", table.by_shape)]
    shown = [bars_shown(rows, key=lambda r: (r.top1, r.top5)) for _, rows in systems]
    many = any(len(rows) > MAX_VERTICAL_BARS for rows, _ in shown)
    if many:
        heights = [bar_chart_height(len(rows)) for rows, _ in shown]
        figure = _figure(11, sum(heights))
        panels = figure.subplots(2, 1, gridspec_kw={"height_ratios": heights})
    else:
        figure = _figure(14, 4.5)
        panels = figure.subplots(1, 2)
    top1_paper = {k: v[0] for k, v in (paper or {}).items()}
    for axes, (system, all_rows), (rows, left_out) in zip(panels, systems, shown):
        # a name the fonts cannot draw: "<system> <its row in Table 2>"
        row_of = {r.group: i for i, r in enumerate(all_rows, 1)}
        bar_panel(axes, [r.group for r in rows], [r.samples for r in rows], [r.top1 for r in rows],
                  [r.top5 for r in rows], f"by {system}", paper=top1_paper, left_out=left_out,
                  names=[figure_text(r.group, f"{system} {row_of[r.group]}") for r in rows])
    return png_bytes(figure, path)


@readable_fonts
def confusion_examples(run: Run, manifest: Manifest, pairs: list[dict[str, Any]],
                       path: str | Path | None = None) -> bytes | None:
    """Per confused pair a misclassified test image of the true class and a test image of
    the predicted class, captioned with the classes' indices and names (:func:`pair_caption`),
    as PNG bytes (written to ``path`` too if given). None when no image can be shown."""
    predictions = pd.read_parquet(BytesIO(run.folder.read_bytes(run_folder.PREDICTIONS)),
                                  columns=["key", "true_class", "top5_classes", "correct_top1"])
    first = predictions["top5_classes"].map(lambda top: int(top[0]))
    cells = []
    for pair in pairs:
        wrong = predictions[(predictions["true_class"] == pair["true"]) & (first == pair["predicted"])]
        other = predictions[predictions["true_class"] == pair["predicted"]].sort_values("correct_top1", ascending=False)
        cells.append([
            (wrong["key"].iloc[0], f"true {pair_caption(pair, 'true', 32)}\n"
                                   f"predicted {pair_caption(pair, 'predicted', 27)}"),
            (other["key"].iloc[0], f"a test image of\n{pair_caption(pair, 'predicted', 32)}") if len(other) else None,
        ])
    keys = [cell[0] for row in cells for cell in row if cell]
    if not keys:
        return None
    images = dict(iter_shard_images(manifest, keys))
    from PIL import Image

    figure = _figure(5, 2.3 * len(cells))
    grid = np.atleast_2d(figure.subplots(len(cells), 2))
    for row, axes_row in zip(cells, grid):
        for cell, axes in zip(row, axes_row):
            axes.set_axis_off()
            if cell is None:
                axes.text(0.5, 0.5, "no test image of this class", ha="center", va="center", fontsize=8)
                continue
            key, caption = cell
            axes.imshow(Image.open(BytesIO(images[key])).convert("RGB"))
            axes.set_title(caption, fontsize=8)
    return png_bytes(figure, path)


def pair_label(pair: dict[str, Any], side: str) -> str:
    """A confused pair's ``side`` ("true" / "predicted") class by name: the product name
    when the metadata gave one, else the class folder name, else its index."""
    return class_label(pair.get(f"{side}_name") or f"#{pair[side]}", pair.get(f"{side}_product_name", ""))


def pair_caption(pair: dict[str, Any], side: str, limit: int) -> str:
    """``#<index> <name>`` of a confused pair's ``side`` class in a figure, the name cut to
    ``limit`` characters; where the fonts cannot draw the name, ``#<index> SKU <sku>``
    (or the index alone when the metadata has no SKU)."""
    sku = pair.get(f"{side}_sku", "")
    name = figure_text(pair_label(pair, side), f"SKU {sku}" if sku else "")
    return f"#{pair[side]} {short(name, limit)}".rstrip()
