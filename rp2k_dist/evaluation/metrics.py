"""Top-1 / top-5 accuracy per meta-category, as in the paper's Table 2.

A sample's meta-category (type and shape) is that of its TRUE class in the manifest
class table, so every group row answers "how well are this category's images
recognised among all classes". The "average" row of the paper is the micro average over
all test images (Table 1's test counts weight it); the macro row, the mean of per-class
accuracies, is added because the classes are heavily imbalanced.

Every accuracy carries its 95 % bootstrap interval (:mod:`rp2k_dist.evaluation.stats`:
test images resampled within each class), shown in its own column beside the figure.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..data.metadata import SHAPES, TYPES
from .predictions import Predictions, class_column
from .stats import Interval, macro_interval, proportion_interval

#: Paper Table 2: {model: {meta-category or "average": (top-1 %, top-5 %)}}.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "resnet34": {
        "dairy": (93.68, 98.45),
        "liquor": (76.99, 96.44),
        "beer": (96.76, 99.16),
        "cosmetics": (87.87, 93.71),
        "soft drinks": (94.86, 98.88),
        "seasonings": (97.96, 99.56),
        "tobacco": (91.89, 98.06),
        "average": (95.18, 99.01),
    },
    "inception_v3": {
        "dairy": (93.38, 98.31),
        "liquor": (79.57, 97.31),
        "beer": (95.19, 98.98),
        "cosmetics": (86.58, 96.56),
        "soft drinks": (93.65, 98.53),
        "seasonings": (97.28, 99.53),
        "tobacco": (91.73, 97.88),
        "average": (94.69, 98.96),
    },
}

#: Paper Table 3 (within the meta-category): general ResNet-34 vs ResNet-34 + API-Net.
PAPER_TABLE3: dict[str, dict[str, tuple[float, float]]] = {
    "resnet34": {"liquor": (76.99, 96.44), "cosmetics": (87.87, 93.71)},
    "resnet34+apinet": {"liquor": (96.47, 99.33), "cosmetics": (93.88, 99.03)},
}

#: Paper Table 4 (ResNet-34, average over the test set): {technique: (top-1 %, top-5 %)}.
PAPER_TABLE4: dict[str, tuple[float, float]] = {
    "from scratch": (95.18, 99.01),
    "transfer learning (ImageNet)": (95.54, 99.04),
    "from scratch + augmentation": (90.41, 94.74),
    "transfer learning + augmentation": (90.89, 95.01),
}


def _hits(labels: np.ndarray, topk: np.ndarray, k: int) -> np.ndarray:
    """bool [N]: the true label is among the first ``k`` columns of ``topk`` [N, K]."""
    return (topk[:, :k] == labels[:, None]).any(axis=1)


def top_k_accuracy(labels: np.ndarray, topk: np.ndarray, k: int) -> float:
    """Fraction in [0, 1] of samples whose label [N] is in the first ``k`` of ``topk``
    [N, K]; nan when N = 0. ``k`` > K uses all K columns (``from_logits`` clips K to the
    number of classes, where top-K then covers every class, as sklearn counts it)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    labels = np.asarray(labels)
    if len(labels) == 0:
        return math.nan
    return float(_hits(labels, np.asarray(topk), k).mean())


@dataclass
class AccuracyRow:
    """One table row: accuracies in percent (0..100, like the paper), each with the bounds
    of its 95 % bootstrap interval (None in rows written before intervals existed)."""

    group: str
    samples: int
    top1: float
    top5: float
    top1_low: float | None = None
    top1_high: float | None = None
    top5_low: float | None = None
    top5_high: float | None = None

    def interval(self, k: int) -> Interval | None:
        """Top-``k`` (1 or 5) with its interval, or None when the row has no bounds."""
        low, high = getattr(self, f"top{k}_low"), getattr(self, f"top{k}_high")
        if low is None or high is None:
            return None
        return Interval(getattr(self, f"top{k}"), low, high, self.samples)


def _row(group: str, labels: np.ndarray, topk: np.ndarray) -> AccuracyRow:
    one, five = (proportion_interval(_hits(labels, topk, k), labels) if len(labels) else None for k in (1, 5))
    return AccuracyRow(
        group, len(labels), 100 * top_k_accuracy(labels, topk, 1), 100 * top_k_accuracy(labels, topk, 5),
        *(one.limits() if one else (None, None)), *(five.limits() if five else (None, None)),
    )


def format_bounds(interval: Interval | None) -> str:
    """``[lo, hi]`` of a 95 % interval in percent; "–" when there is none."""
    return "–" if interval is None else interval.bounds


def format_percent(value: float | None) -> str:
    """A percentage with two decimals, like the paper; "–" for None or nan."""
    return "–" if value is None or math.isnan(value) else f"{value:.2f}"


@dataclass
class AccuracyTable:
    """Table 2 of the paper for one model, plus shape rows and a macro average."""

    by_type: list[AccuracyRow]  # TYPES order, then other values (e.g. "unknown") alphabetically
    by_shape: list[AccuracyRow]  # SHAPES order, then others alphabetically
    overall: AccuracyRow  # micro average over all samples (the paper's "average")
    macro: AccuracyRow  # mean over test classes of per-class accuracy; samples = all samples

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self, paper: dict[str, tuple[float, float]] | None = None) -> str:
        """Markdown in Table 2's layout: type rows, shape rows (own sub-header), then
        average (micro) and macro. With ``paper`` ({group or "average": (top-1, top-5)},
        e.g. ``PAPER_TABLE2["resnet34"]``) two paper columns are added; "–" = not reported."""
        header = ["meta-category", "samples", "top-1", "95 % CI", "top-5", "95 % CI"]
        if paper is not None:
            header += ["paper top-1", "paper top-5"]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

        def line(label: str, row: AccuracyRow, paper_key: str | None) -> str:
            cells = [label, str(row.samples), format_percent(row.top1), format_bounds(row.interval(1)),
                     format_percent(row.top5), format_bounds(row.interval(5))]
            if paper is not None:
                reported = paper.get(paper_key) if paper_key else None
                cells += [format_percent(reported[0]), format_percent(reported[1])] if reported else ["–", "–"]
            return "| " + " | ".join(cells) + " |"

        def sub_header(label: str) -> str:
            return "| " + " | ".join([f"**{label}**"] + [""] * (len(header) - 1)) + " |"

        lines.append(sub_header("type"))
        lines += [line(r.group, r, r.group) for r in self.by_type]
        lines.append(sub_header("shape"))
        lines += [line(r.group, r, r.group) for r in self.by_shape]
        lines.append(line("average (micro)", self.overall, "average"))
        lines.append(line("macro (per-class mean)", self.macro, None))
        return "\n".join(lines) + "\n"


def _paper_order(values: set[str], order: tuple[str, ...]) -> list[str]:
    return [v for v in order if v in values] + sorted(values - set(order))


def _group_rows(predictions: Predictions, groups: np.ndarray, order: tuple[str, ...]) -> list[AccuracyRow]:
    rows = []
    for group in _paper_order(set(groups), order):
        mask = groups == group
        rows.append(_row(group, predictions.labels[mask], predictions.topk[mask]))
    return rows


def accuracy_table(predictions: Predictions, classes: list[dict[str, Any]]) -> AccuracyTable:
    """Table 2 from predictions and the manifest class table (index order). A sample's
    type/shape is its true class's; missing or empty values count as "unknown"."""
    labels = predictions.labels
    types = class_column(classes, "type")[labels]
    shapes = class_column(classes, "shape")[labels]
    macro_top1 = per_class_accuracy(predictions, len(classes), k=1)
    macro_top5 = per_class_accuracy(predictions, len(classes), k=5)
    present = ~np.isnan(macro_top1)
    macro_bounds = [macro_interval(_hits(labels, predictions.topk, k), labels).limits() if len(labels) else (None, None)
                    for k in (1, 5)]
    return AccuracyTable(
        by_type=_group_rows(predictions, types, TYPES),
        by_shape=_group_rows(predictions, shapes, SHAPES),
        overall=_row("average", labels, predictions.topk),
        macro=AccuracyRow(
            "macro",
            len(labels),
            100 * float(macro_top1[present].mean()) if present.any() else math.nan,
            100 * float(macro_top5[present].mean()) if present.any() else math.nan,
            *macro_bounds[0], *macro_bounds[1],
        ),
    )


def per_class_accuracy(predictions: Predictions, num_classes: int, k: int = 1) -> np.ndarray:
    """float64 [num_classes]: top-``k`` accuracy (fraction) of each class's test samples;
    nan for classes without test samples."""
    labels = predictions.labels
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels, weights=_hits(labels, predictions.topk, k), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / total, np.nan)


def confused_pairs(predictions: Predictions, classes: list[dict[str, Any]], top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` most frequent (true class, predicted top-1) pairs with true != predicted,
    sorted by count (desc), then true index, then predicted index. ``share_of_true`` is
    count / test samples of the true class in ``predictions``."""
    labels, predicted = predictions.labels, predictions.topk[:, 0]
    wrong = labels != predicted
    if not wrong.any():
        return []
    pairs, counts = np.unique(np.stack([labels[wrong], predicted[wrong]], axis=1), axis=0, return_counts=True)
    order = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:top]
    per_class = np.bincount(labels, minlength=len(classes))
    names = class_column(classes, "name", default="")
    products = class_column(classes, "product_name", default="")
    skus = class_column(classes, "sku", default="")
    return [
        {
            "true": int(true),
            "true_name": names[true],
            "true_product_name": products[true],
            "true_sku": skus[true],
            "predicted": int(pred),
            "predicted_name": names[pred],
            "predicted_product_name": products[pred],
            "predicted_sku": skus[pred],
            "count": int(count),
            "share_of_true": float(count / per_class[true]),
        }
        for (true, pred), count in zip(pairs[order], counts[order])
    ]
