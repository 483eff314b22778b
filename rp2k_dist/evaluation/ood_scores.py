"""Open-set scores: how "known" a query looks, one number per image, **higher = more known**
for every score, and the measures of telling known from unknown images with them.

Scores (each a few lines, vectorised over a batch):

* ``msp``: the maximum softmax probability over the classes the model trained on
  (Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
  Examples in Neural Networks", ICLR 2017).
* ``max_logit``: the maximum logit (Hendrycks et al., "Scaling Out-of-Distribution
  Detection for Real-World Settings", ICML 2022).
* ``energy``: the negative free energy ``T logsumexp(f / T)``, T = 1 (Liu et al.,
  "Energy-based Out-of-distribution Detection", NeurIPS 2020).
* ``knn``: minus the Euclidean distance of the unit-norm embedding to its k-th nearest
  training embedding, ``-sqrt(2 - 2 cos_k)`` (Sun et al., "Out-of-Distribution Detection
  with Deep Nearest Neighbors", ICML 2022); k is chosen on validation from :data:`KNN_KS`.
* ``gallery``: the best cosine similarity to a gallery of the seen classes (the score
  ``rp2k openset`` had before the others).

The classifier's scores look only at the logits of the classes the model trained on (a
run with ``data.holdout_classes`` keeps an output for its unseen classes that was never a
target). Measures: :func:`~.stats.auroc`; FPR at 95 % TPR (:func:`fpr_at_tpr`: the share of
unknown images accepted by the threshold that accepts 95 % of the known ones of the same
set); FAR at a threshold fixed beforehand on validation (:func:`far_at`). Their 95 %
intervals come from :mod:`.stats` (AUROC: :func:`~.stats.auroc_interval`; FAR:
:func:`~.stats.proportion_interval` within each unseen class; FPR95: the same percentile
bootstrap, known and unknown images resampled, the threshold recomputed in each resample).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .stats import LEVEL, RESAMPLES, SEED, Interval, _percentiles, auroc, auroc_interval, proportion_interval

#: Every score, in the order tables show them.
SCORES = ("msp", "max_logit", "energy", "knn", "gallery")
#: Scores computed from the classifier's logits.
LOGIT_SCORES = ("msp", "max_logit", "energy")
#: Candidate k of the k-NN score (Sun et al. use k = 50 on CIFAR-10 and 1,000 on ImageNet).
KNN_KS = (1, 5, 10, 50)
#: Share of known images the thresholds accept.
TPR = 0.95


def msp(logits: np.ndarray) -> np.ndarray:
    """Maximum softmax probability of each row of ``logits`` [N, C]."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return 1.0 / np.exp(shifted).sum(axis=1)  # exp(max - max) / sum exp(l - max)


def max_logit(logits: np.ndarray) -> np.ndarray:
    """Maximum logit of each row [N, C]."""
    return np.asarray(logits, np.float64).max(axis=1)


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Negative free energy ``T logsumexp(logits / T)`` of each row (higher = more known)."""
    scaled = np.asarray(logits, np.float64) / temperature
    top = scaled.max(axis=1)
    return temperature * (top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)))


def kth_similarity(queries: np.ndarray, bank: np.ndarray, ks: Sequence[int], chunk: int = 2048) -> dict[int, np.ndarray]:
    """k -> the k-th largest cosine similarity of each unit-norm query [M, D] to the
    unit-norm ``bank`` [N, D] (k at most N), in chunks of queries (bounded memory)."""
    ks = [k for k in ks if 1 <= k <= len(bank)]
    out = {k: np.empty(len(queries), np.float64) for k in ks}
    bank = np.asarray(bank, np.float32)
    for start in range(0, len(queries), chunk):
        sims = np.asarray(queries[start:start + chunk], np.float32) @ bank.T
        ordered = -np.sort(-sims, axis=1)[:, :max(ks)] if ks else sims[:, :0]
        for k in ks:
            out[k][start:start + len(sims)] = ordered[:, k - 1]
    return out


def knn(queries: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """Minus the Euclidean distance of each unit-norm query to its ``k``-th nearest vector of
    ``bank`` (unit norm: ``||a - b||^2 = 2 - 2 a.b``)."""
    return knn_of_similarity(kth_similarity(queries, bank, [k])[k])


def knn_of_similarity(similarity: np.ndarray) -> np.ndarray:
    return -np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.asarray(similarity, np.float64)))


def gallery(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Best cosine similarity of each unit-norm query to the unit-norm gallery ``vectors``."""
    return kth_similarity(queries, vectors, [1])[1]


def logit_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """The classifier's scores of logits [N, C] (the trained classes' columns)."""
    return {"msp": msp(logits), "max_logit": max_logit(logits), "energy": energy(logits)}


def calibrate_threshold(scores: np.ndarray, tar: float = TPR) -> float:
    """The highest similarity threshold that still accepts at least ``tar`` of the known
    queries whose best-match ``scores`` are given: the ``floor((1 - tar) n)``-th smallest."""
    scores = np.sort(np.asarray(scores, np.float64))
    if not len(scores):
        raise DataError("no validation queries to calibrate the threshold on")
    if not 0.0 < tar <= 1.0:
        raise ConfigError(f"--tar must be in (0, 1], got {tar}")
    return float(scores[min(len(scores) - 1, math.floor((1.0 - tar) * len(scores)))])


def far_at(unknown: np.ndarray, threshold: float) -> np.ndarray:
    """bool [N]: unknown images accepted (score >= threshold)."""
    return np.asarray(unknown, np.float64) >= threshold


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = TPR) -> float:
    """Percent of ``unknown`` accepted by the threshold that accepts ``tpr`` of ``known``
    (FPR at 95 % TPR); nan when a side is empty."""
    if not len(known) or not len(unknown):
        return math.nan
    return 100.0 * float(np.mean(far_at(unknown, calibrate_threshold(known, tpr))))


def fpr_interval(known: np.ndarray, unknown: np.ndarray, tpr: float = TPR, *, resamples: int = RESAMPLES,
                 level: float = LEVEL, seed: int = SEED) -> Interval:
    """:func:`fpr_at_tpr` with its percentile bootstrap interval (both sides resampled, the
    threshold recomputed on each resample of the known images)."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    estimate = fpr_at_tpr(known, unknown, tpr)
    n = len(known) + len(unknown)
    if math.isnan(estimate):
        return Interval(math.nan, math.nan, math.nan, n)
    rng = np.random.default_rng(seed)
    drawn_known = np.sort(known[rng.integers(0, len(known), (resamples, len(known)))], axis=1)
    cut = drawn_known[:, min(len(known) - 1, math.floor((1.0 - tpr) * len(known)))]
    drawn_unknown = unknown[rng.integers(0, len(unknown), (resamples, len(unknown)))]
    low, high = _percentiles(100.0 * (drawn_unknown >= cut[:, None]).mean(axis=1), level)
    return Interval(estimate, low, high, n)


@dataclass
class ScoreRow:
    """One score's figures: AUROC on validation (what chose it) and on test, FPR at 95 %
    TPR on test, FAR and TAR on test at the threshold chosen on validation; bounds [low,
    high] in ``intervals`` (None = undefined)."""

    score: str
    k: int | None  # the k-NN score's k (chosen on validation); None for the others
    threshold: float | None
    validation_auroc: float | None
    auroc: float | None
    fpr95: float | None
    far: float | None
    tar: float | None
    intervals: dict[str, list[float | None]] = field(default_factory=dict)
    #: open-set accuracy (percent) of a gallery answering with this score at this threshold
    accuracy: float | None = None

    @property
    def label(self) -> str:
        return f"knn (k={self.k})" if self.score == "knn" and self.k else self.score


def score_row(name: str, k: int | None, validation_known: np.ndarray, validation_unknown: np.ndarray,
              known: np.ndarray, unknown: np.ndarray, unknown_strata: np.ndarray, tpr: float = TPR) -> ScoreRow:
    """The figures of one score: the threshold accepts ``tpr`` of the validation known images,
    and is applied unchanged to the test images (``known`` vs ``unknown``)."""
    threshold = calibrate_threshold(validation_known, tpr)
    accepted, kept = far_at(unknown, threshold), far_at(known, threshold)
    auc = auroc_interval(known, unknown)
    fpr = fpr_interval(known, unknown, tpr)
    far = proportion_interval(accepted, unknown_strata)
    tar = proportion_interval(kept)
    validation = auroc(validation_known, validation_unknown)
    return ScoreRow(name, k, threshold, _finite(validation), _finite(auc.estimate), _finite(fpr.estimate),
                    _finite(far.estimate), _finite(tar.estimate),
                    {"auroc": auc.limits(), "fpr95": fpr.limits(), "far": far.limits(), "tar": tar.limits()})


def choose(rows: Sequence[ScoreRow], default: str = "gallery") -> tuple[ScoreRow, str]:
    """The score with the highest validation AUROC (ties: the first in :data:`SCORES`
    order), and why; ``default`` when no score has a validation AUROC (no validation-unseen
    class)."""
    measured = [r for r in rows if r.validation_auroc is not None]
    if not measured:
        row = next(r for r in rows if r.score == default)
        return row, f"no validation-unseen class to choose on: {default}, the default"
    best = max(measured, key=lambda r: r.validation_auroc)
    others = ", ".join(f"{r.label} {r.validation_auroc:.3f}" for r in measured if r is not best)
    return best, f"the highest validation AUROC, {best.validation_auroc:.3f} (others: {others})"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _cell(value: float | None, bounds: list[float | None] | None, digits: int) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}f}"
    if bounds and None not in bounds:
        text += f" [{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"
    return text


def scores_markdown(rows: Sequence[ScoreRow | dict[str, Any]], chosen: str | None = None) -> str:
    """The per-score table: validation AUROC, then test AUROC, FPR95, FAR and TAR, each with
    its 95 % interval; the chosen score marked."""
    rows = [r if isinstance(r, ScoreRow) else ScoreRow(**r) for r in rows]
    lines = ["| score | validation AUROC | test AUROC | FPR @ 95 % TPR | FAR @ validation threshold | test TAR | "
             "open-set accuracy | threshold |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = " **(chosen)**" if r.score == chosen else ""
        threshold = "–" if r.threshold is None else f"{r.threshold:.4g}"
        lines.append(f"| {r.label}{mark} | {_cell(r.validation_auroc, None, 3)} | "
                     f"{_cell(r.auroc, r.intervals.get('auroc'), 3)} | {_cell(r.fpr95, r.intervals.get('fpr95'), 1)} | "
                     f"{_cell(r.far, r.intervals.get('far'), 1)} | {_cell(r.tar, r.intervals.get('tar'), 1)} | "
                     f"{_cell(r.accuracy, r.intervals.get('accuracy'), 1)} | {threshold} |")
    return "\n".join(lines)
