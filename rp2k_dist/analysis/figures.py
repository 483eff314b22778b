"""Figure rules that hold from 3 to 300 categories (the paper has 7 types and 7 shapes;
users bring their own catalogues).

- Colours: up to :data:`MAX_COLOURS` categories each get a distinct colour; beyond that
  the largest ``MAX_COLOURS - 1`` are coloured and the rest share grey as
  ``other (N categories)``. ``unknown`` is always grey.
- Legends sit outside the axes, in as many columns as the height needs; the
  constrained layout then sizes the axes around them, so nothing is cut.
- Names are drawn only where the fonts have their glyphs (:mod:`.fonts`); else a category
  is named by its position (``category 3``), a class by its index or SKU.
- Per-category bars are vertical for a few categories; for many they turn horizontal,
  sorted, with the best and the worst :data:`MAX_BARS` // 2 shown when there are more.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .fonts import figure_text

#: Distinct colours available (matplotlib's tab20, light shades after dark ones).
MAX_COLOURS = 20
#: Vertical bars up to this many categories (the paper's 7 and "unknown"), horizontal beyond.
MAX_VERTICAL_BARS = 8
#: Horizontal bar charts show at most this many categories (the best and the worst half).
MAX_BARS = 60
GREY = "#9a9a9a"
LABEL_CHARS = 28


def _palette(n: int) -> list[str]:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    tab20 = colormaps["tab20"]
    return [tab20(2 * i) for i in range(10)] + [tab20(2 * i + 1) for i in range(10)]


def short(text: str, limit: int = LABEL_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (legend and tick labels)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Colouring:
    """Which colour each category gets, and the legend entries (label, colour) in order."""

    colour: dict[str, Any]
    legend: list[tuple[str, Any]]


def category_colours(counts: dict[str, int], order: Sequence[str] = ()) -> Colouring:
    """Colours for categories with ``counts`` (samples each). Categories listed in
    ``order`` (the paper's) come first in that order, the others by size."""
    named = [c for c in counts if c != "unknown"]
    ranked = sorted(named, key=lambda c: (order.index(c) if c in order else len(order), -counts[c], c))
    if len(ranked) <= MAX_COLOURS:
        coloured, rest = ranked, []
    else:
        largest = set(sorted(named, key=lambda c: (-counts[c], c))[: MAX_COLOURS - 1])
        coloured, rest = [c for c in ranked if c in largest], [c for c in ranked if c not in largest]
    palette = _palette(len(coloured))
    colour = {c: palette[i] for i, c in enumerate(coloured)}
    legend = [(f"{short(figure_text(c, f'category {i}'))} ({counts[c]:,})", colour[c])
              for i, c in enumerate(coloured, 1)]
    grey = rest + (["unknown"] if "unknown" in counts else [])
    colour.update({c: GREY for c in grey})
    if rest:
        legend.append((f"other ({len(rest)} categories, {sum(counts[c] for c in rest):,})", GREY))
    elif "unknown" in counts:
        legend.append((f"unknown ({counts['unknown']:,})", GREY))
    if rest and "unknown" in counts:
        legend[-1] = (f"other + unknown ({len(rest)} categories, {sum(counts[c] for c in grey):,})", GREY)
    return Colouring(colour, legend)


def legend_outside(axes, handles: list, labels: list[str], title: str, rows: int = 24, **kwargs):
    """A legend to the right of ``axes``, ``rows`` entries per column."""
    columns = max(1, -(-len(labels) // rows))
    return axes.legend(handles, labels, title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       borderaxespad=0.0, ncols=columns, fontsize=9, frameon=False, **kwargs)


def bars_shown(rows: list[Any], key) -> tuple[list[Any], int]:
    """The rows a bar chart shows, sorted best first by ``key`` when there are many, and
    how many were left out in the middle."""
    if len(rows) <= MAX_VERTICAL_BARS:
        return rows, 0
    ranked = sorted(rows, key=key, reverse=True)
    if len(ranked) <= MAX_BARS:
        return ranked, 0
    half = MAX_BARS // 2
    return ranked[:half] + ranked[-half:], len(ranked) - 2 * half


def bar_panel(axes, groups: list[str], samples: list[int], top1: list[float], top5: list[float], title: str,
              paper: dict[str, float] | None = None, left_out: int = 0, names: list[str] | None = None) -> None:
    """Top-1 / top-5 bars per group (``samples`` test images each): vertical for a few
    groups, horizontal (first group at the top) for many; paper top-1 as black ticks.
    ``left_out``: groups dropped between the first and the second half (a dashed line);
    ``names``: the tick labels (default: ``groups``)."""
    import numpy as np

    names = names or groups

    position = np.arange(len(groups))
    reported = [(i, paper[g]) for i, g in enumerate(groups) if paper and g in paper]
    if len(groups) <= MAX_VERTICAL_BARS:
        axes.bar(position - 0.2, top1, 0.4, label="top-1")
        axes.bar(position + 0.2, top5, 0.4, label="top-5", alpha=0.6)
        if reported:
            axes.scatter([i - 0.2 for i, _ in reported], [v for _, v in reported], marker="_", s=300, c="k",
                         label="paper top-1")
        wrapped = ["\n".join(textwrap.wrap(g, 12, max_lines=3, placeholder="…") + [f"(n={n:,})"])
                   for g, n in zip(names, samples)]
        axes.set_xticks(position, wrapped, fontsize=8)
        axes.set(ylabel="%", ylim=(0, 105))
        axes.grid(axis="y", alpha=0.3)
    else:
        axes.barh(position - 0.2, top1, 0.4, label="top-1")
        axes.barh(position + 0.2, top5, 0.4, label="top-5", alpha=0.6)
        if reported:
            axes.scatter([v for _, v in reported], [i - 0.2 for i, _ in reported], marker="|", s=120, c="k",
                         label="paper top-1")
        axes.set_yticks(position, [f"{short(g, 24)} (n={n:,})" for g, n in zip(names, samples)], fontsize=8)
        axes.set(xlabel="%", xlim=(0, 105), ylim=(len(groups) - 0.5, -0.5))  # best at the top
        axes.grid(axis="x", alpha=0.3)
        if left_out:
            axes.axhline(len(groups) // 2 - 0.5, color="k", linestyle="--", linewidth=0.8)
            title += f" (the best and the worst {len(groups) // 2}; {left_out} in between left out)"
    axes.set_title(title)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def bar_chart_height(n: int) -> float:
    """Inches a bar panel of ``n`` groups needs (about 0.2 in per horizontal bar)."""
    return 4.0 if n <= MAX_VERTICAL_BARS else 1.2 + 0.2 * min(n, MAX_BARS)


def class_label(name: str, product_name: str = "") -> str:
    """How a class is named in figures: its product name, else its class folder name."""
    return product_name or name
