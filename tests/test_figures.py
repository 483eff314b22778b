"""Figures stay readable from 3 to 300 categories: legends inside the canvas, no
overlapping labels, grey 'other' beyond 20 colours, confused pairs named."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rp2k_dist.analysis.figures import GREY, MAX_COLOURS, category_colours, short
from rp2k_dist.analysis.report import plot_categories
from rp2k_dist.analysis.umap_plot import plot_umap
from rp2k_dist.evaluation.metrics import AccuracyRow, AccuracyTable


def _names(n: int) -> list[str]:
    return [f"category {i:03d}" + (" with a long catalogue name" if i % 7 == 0 else "") for i in range(n)]


def _umap_frame(n: int, rng) -> pd.DataFrame:
    names = _names(n)
    sizes = np.maximum(1, (400 / (1 + np.arange(n)) ** 0.7).astype(int))  # long-tailed
    values = np.repeat(names, sizes)
    return pd.DataFrame({"key": [f"k{i}" for i in range(len(values))], "type": values,
                         "shape": rng.permutation(values), "umap_x": rng.normal(size=len(values)),
                         "umap_y": rng.normal(size=len(values))})




def _no_overlap(boxes) -> bool:
    return not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))


def _check_inside(figure: Figure) -> None:
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    canvas = figure.bbox
    legends = [legend for axes in figure.axes if (legend := axes.get_legend())]
    assert legends
    for legend in legends:
        box = legend.get_tightbbox(renderer)
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 + 0.5 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1 + 0.5
        assert _no_overlap([t.get_window_extent(renderer) for t in legend.get_texts()])
    for axes in figure.axes:
        box = axes.get_tightbbox(renderer)
        assert canvas.x0 - 0.5 <= box.x0 and box.x1 <= canvas.x1 + 0.5, "an axes runs off the canvas"
        for ticks in (axes.get_xticklabels(), axes.get_yticklabels()):
            assert _no_overlap([t.get_window_extent(renderer) for t in ticks if t.get_text()])


@pytest.fixture()
def keep_figures(monkeypatch):
    """Every Figure the plotting code saves, kept for inspection after savefig."""
    saved: list[Figure] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


@pytest.mark.parametrize("n", [3, 43, 300])
def test_umap_legends_fit_and_panels_stay_square(n, tmp_path, keep_figures):
    df = _umap_frame(n, np.random.default_rng(n))
    plot_umap(df, tmp_path / f"umap{n}.png", f"{n} categories")
    figure = keep_figures[-1]
    _check_inside(figure)
    renderer = FigureCanvasAgg(figure).get_renderer()
    for axes in figure.axes:
        box = axes.get_window_extent(renderer)
        assert box.width == pytest.approx(box.height, rel=0.02)  # square, whatever n
        assert box.height > 0.6 * figure.bbox.height
        labels = [t.get_text() for t in axes.get_legend().get_texts()]
        assert len(labels) == min(n, MAX_COLOURS)
        if n > MAX_COLOURS:
            assert labels[-1].startswith(f"other ({n - MAX_COLOURS + 1} categories")


def test_colours_distinct_up_to_twenty_then_grey_for_the_rest():
    few = category_colours({c: 10 + i for i, c in enumerate(_names(20))})
    assert len(set(map(tuple, few.colour.values()))) == 20 and GREY not in few.colour.values()
    counts = {c: 1000 - i for i, c in enumerate(_names(43))} | {"unknown": 5}
    many = category_colours(counts)
    coloured = [c for c, colour in many.colour.items() if colour != GREY]
    assert coloured == _names(19)  # the largest
    assert len(set(map(tuple, (many.colour[c] for c in coloured)))) == 19
    assert many.legend[-1] == (f"other + unknown (24 categories, {sum(1000 - i for i in range(19, 43)) + 5:,})", GREY)


def _table(n: int) -> AccuracyTable:
    rows = [AccuracyRow(name, 10 + i, float((37 * i) % 100), float(min(100, (37 * i) % 100 + 20)))
            for i, name in enumerate(_names(n))]
    return AccuracyTable(rows, rows[: min(n, 7)], AccuracyRow("all", 1, 50.0, 70.0), AccuracyRow("macro", 1, 50.0, 70.0))


@pytest.mark.parametrize("n", [3, 43, 300])
def test_category_bars_fit_and_turn_horizontal_and_sorted(n, tmp_path, keep_figures):
    plot_categories(_table(n), tmp_path / f"bars{n}.png")
    figure = keep_figures[-1]
    _check_inside(figure)
    types = figure.axes[0]
    if n <= 8:
        labels = [t.get_text().split("\n") for t in types.get_xticklabels()]
        assert [name.startswith(lines[0]) for lines, name in zip(labels, _names(n))] == [True] * n
    else:
        labels = [t.get_text() for t in types.get_yticklabels()]
        top1 = {f"{short(name, 24)} (n={10 + i})": float((37 * i) % 100) for i, name in enumerate(_names(n))}
        shown = [top1[label] for label in labels]
        assert shown == sorted(shown, reverse=True)  # best at the top
        assert len(labels) == min(n, 60)
