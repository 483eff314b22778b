"""Table 3 as text: its Markdown table (columns (a)-(e) with intervals, the paper's numbers), the
paired differences that decide (:data:`DIFFERENCES`), and the one-line :func:`verdict`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .metrics import PAPER_TABLE3, format_percent
from .stats import Difference, Interval


#: The paired top-1 comparisons of Table 3: (label, minuend column, subtrahend column):
#: what knowing the category is worth, what the specialist adds on the category's classes,
#: and what each routed ensemble changes against the general model.
DIFFERENCES = (
    ("(b)-(a)", "restricted", "general"),
    ("(c)-(b)", "specialist", "restricted"),
    ("(d)-(a)", "ensemble", "general"),
    ("(e)-(a)", "mass", "general"),
)

#: Table 3's columns: (key prefix, header). Each cell shows "top-1 [95 % CI] / top-5".
TABLE3_COLUMNS = (
    ("general", "(a) general"),
    ("restricted", "(b) general, category's classes"),
    ("specialist", "(c) specialist alone"),
    ("ensemble", "(d) routed by top-1"),
    ("mass", "(e) routed by mass"),
)
#: Routing columns: (key prefix of recall and precision, header). Each cell: "recall / precision".
ROUTING_COLUMNS = (("routing", "routing (d): recall / precision"), ("mass", "routing (e): recall / precision"))


def table3_markdown(
    rows: list[dict[str, Any]], paper: dict[str, dict[str, tuple[float, float]]] | None = PAPER_TABLE3
) -> str:
    """Markdown of :func:`table3` rows: columns (a)-(e) as "top-1 [95 % CI] / top-5", each routing
    rule's recall / precision and the mass threshold; with ``paper`` (keys "resnet34" and
    "resnet34+apinet", like :data:`PAPER_TABLE3`) the paper's general model (its (a)) and
    ensemble (its (d)) are added. "–" where not reported or not computed (rows written
    before a column existed included)."""
    header = (["meta-category", "images"] + [title for _, title in TABLE3_COLUMNS]
              + [title for _, title in ROUTING_COLUMNS] + ["mass threshold"])
    if paper is not None:
        header += ["paper R34", "paper R34+API-Net"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [row["meta_category"], str(row["samples"])]
        cells += [_pair(row.get(f"{name}_top1"), row.get(f"{name}_top5"), row.get(f"{name}_top1_ci"))
                  for name, _ in TABLE3_COLUMNS]
        cells += [_pair(row.get(f"{name}_recall"), row.get(f"{name}_precision")) for name, _ in ROUTING_COLUMNS]
        threshold = row.get("mass_threshold")
        cells.append("–" if threshold is None else f"{threshold:.3f}")
        if paper is not None:
            for model in ("resnet34", "resnet34+apinet"):
                reported = paper.get(model, {}).get(row["meta_category"])
                cells.append(_pair(*reported) if reported else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def differences_markdown(rows: list[dict[str, Any]]) -> str:
    """Markdown of the paired top-1 differences of :func:`table3` rows (:data:`DIFFERENCES`),
    in points with their 95 % interval and McNemar's p; "–" where a column is missing."""
    header = ["meta-category", "images"] + [f"{label} top-1, points [95 % CI], McNemar p" for label, _, _ in DIFFERENCES]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in rows:
        cells = [row["meta_category"], str(row["samples"])]
        for label, _, _ in DIFFERENCES:
            given = (row.get("differences") or {}).get(label)
            if given is None:
                cells.append("–")
                continue
            difference = Difference.from_dict(given)
            cells.append(f"{difference.estimate:+.1f} {difference.bounds}, p {difference.p_value:.2g}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence: did the specialists help, by how much, and if not why.

    Judged per category on top-1 by the paired difference (d) - (a) of the ensemble routed by
    the top-1 rule and the general model on the category's images: "helped" / "hurt" only
    where its 95 % interval excludes 0, else "no difference detectable on N images"; (e) - (a)
    is given beside it. Where (d) did not detectably help, the reason given is: the specialist
    alone is not detectably better than the general model among the category's classes
    ((c) - (b)), else the routing (its recall and precision). Rows written before intervals
    existed (no ``differences``) are judged on point estimates, and the sentence says so."""
    parts, outcome = [], {}
    for row in rows:
        differences = {label: Difference.from_dict(d) for label, d in (row.get("differences") or {}).items()}
        name = row["meta_category"]
        d_a, e_a, c_b = differences.get("(d)-(a)"), differences.get("(e)-(a)"), differences.get("(c)-(b)")
        if d_a is None:  # an ensemble.json written before intervals: the old point comparison
            a, d = row["general_top1"], row["ensemble_top1"]
            outcome[name] = "helped" if d > a else "hurt" if d < a else "none"
            text = f"{name} (d) {d:.1f} % vs (a) {a:.1f} % top-1 (point estimates, no interval)"
        else:
            outcome[name] = ("helped" if d_a.estimate > 0 else "hurt") if d_a.excludes_zero() else "none"
            text = f"{name} (d) - (a) {d_a.verdict()}"
            if e_a is not None:
                text += f", (e) - (a) {e_a.verdict()}"
        if outcome[name] != "helped" and d_a is not None:
            if c_b is not None and not (c_b.excludes_zero() and c_b.estimate > 0):
                text += (f"; the specialist alone is not detectably better than the general model among the "
                         f"category's classes ((c) - (b) {c_b.estimate:+.1f} points, CI {c_b.bounds})")
            elif c_b is not None:
                text += (f"; routing loses the specialist's gain ((c) - (b) {c_b.estimate:+.1f} points, CI "
                         f"{c_b.bounds}): (d) sends {format_percent(row.get('routing_recall'))} % of the category's "
                         f"images to the specialist (precision {format_percent(row.get('routing_precision'))} %)")
        parts.append(text)
    helped = [n for n, o in outcome.items() if o == "helped"]
    hurt = [n for n, o in outcome.items() if o == "hurt"]
    if helped and len(helped) == len(outcome):
        lead = "The specialists helped"
    elif helped or hurt:
        lead = "; ".join(part for part in (f"The specialists helped on {', '.join(helped)}" if helped else "",
                                            f"{'they' if helped else 'The specialists'} hurt on {', '.join(hurt)}"
                                            if hurt else "") if part)
    else:
        lead = "No effect of the specialists is detectable"
    return f"{lead} (the top-1 routed ensemble (d) against the general model (a), paired on the same images): " \
           f"{'; '.join(parts)}."


def _pair(top1: float | None, top5: float | None, bounds: Sequence[float | None] | None = None) -> str:
    """``top-1 / top-5``, the top-1 followed by its ``[lo, hi]`` when ``bounds`` are given."""
    if top1 is None and top5 is None:
        return "–"
    interval = "" if not bounds or None in bounds else " " + Interval(math.nan, bounds[0], bounds[1], 0).bounds
    return f"{format_percent(top1)}{interval} / {format_percent(top5)}"
