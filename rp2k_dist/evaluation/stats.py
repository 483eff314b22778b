"""How far a figure can be trusted: bootstrap confidence intervals, paired differences and
the verdict a difference supports.

Every accuracy this project prints comes from one finite test set; a 95 % interval says how
much it would move on another draw of test images of the same classes:

* :func:`proportion_interval`: the percentile bootstrap of a share of images (top-1, top-5,
  recall@k, a false-accept rate), resampled with replacement **within each class** (so
  class counts stay fixed, as in Efron & Tibshirani, *An Introduction to the Bootstrap*,
  1993, ch. 3 and 13). For a 0/1 vector the resampled hits of a class of n images with h
  right are exactly ``Binomial(n, h / n)``, so the resamples are drawn as counts per class
  instead of an (R, N) index matrix: the same distribution in O(R * classes), 2,000
  resamples of a 40k-image test split in milliseconds.
* :func:`macro_interval`: the same resampling for the mean of per-class accuracies.
* :func:`paired_difference`: A - B on the same images. Per class the resample draws the
  counts of images only A got right and only B got right (a multinomial over the
  discordant cells), so two identical prediction sets give exactly [0, 0]. McNemar's exact
  test on the discordant pairs is given beside it (Dietterich, "Approximate Statistical
  Tests for Comparing Supervised Classification Learning Algorithms", Neural Computation
  1998, recommends it for one test set).
* :func:`paired_difference_over_seeds`: A - B on the same images, each run in several
  seeds: the images are resampled (within each class) with all their seeds together, since
  the seeds are repeated measurements of one test set, not more test images.
* :func:`auroc_interval`: AUROC of known vs unknown scores, resampling each group.
* :func:`wilson_interval`: the analytic score interval of one proportion (the check of the
  bootstrap in the tests).

Resampling uses a fixed seed (:data:`SEED`), so a table prints the same interval every time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Resamples of every interval (Efron & Tibshirani suggest 1,000+ for percentile intervals).
RESAMPLES = 2000
#: Two-sided level of every interval.
LEVEL = 0.95
#: Seed of the resampling, fixed so that an interval is a function of the predictions alone.
SEED = 0
#: Classes with fewer test images than this are resampled together as one stratum: the
#: bootstrap variance of a stratum of n images is (n - 1) / n of the real one, so a class of
#: one image would add none and many tiny classes would shrink an interval below its truth.
MIN_STRATUM = 5


@dataclass(frozen=True)
class Interval:
    """A figure with its bootstrap interval; percent (0..100) for shares, 0..1 for AUROC."""

    estimate: float
    low: float
    high: float
    n: int  #: images (or pairs) it was computed on
    digits: int = 1  #: decimals shown: 1 for percent, 3 for a 0..1 figure such as AUROC

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": _finite(self.estimate), "low": _finite(self.low), "high": _finite(self.high), "n": self.n}

    def limits(self) -> list[float | None]:
        """``[low, high]``, JSON-safe (None where undefined): what files keep of the interval."""
        return [_finite(self.low), _finite(self.high)]

    @classmethod
    def from_dict(cls, data: dict[str, Any], digits: int = 1) -> "Interval":
        return cls(*(math.nan if data[k] is None else float(data[k]) for k in ("estimate", "low", "high")),
                   int(data["n"]), digits)

    @property
    def bounds(self) -> str:
        """``[lo, hi]`` with :attr:`digits` decimals; "–" when undefined."""
        if math.isnan(self.low) or math.isnan(self.high):
            return "–"
        return f"[{self.low:.{self.digits}f}, {self.high:.{self.digits}f}]"

    def format(self) -> str:
        """``45.4 [43.3, 47.5]``; "–" when the figure is undefined (no images)."""
        if math.isnan(self.estimate):
            return "–"
        return f"{self.estimate:.{self.digits}f} {self.bounds}"

    def excludes_zero(self) -> bool:
        return not math.isnan(self.low) and (self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Difference(Interval):
    """A paired difference A - B in points, with McNemar's exact test on the same images."""

    only_a: int = 0  #: images A got right and B did not
    only_b: int = 0  #: images B got right and A did not
    p_value: float = 1.0  #: McNemar's exact two-sided p on the discordant pairs

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "only_a": self.only_a, "only_b": self.only_b, "mcnemar_p": _finite(self.p_value)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Difference":
        base = Interval.from_dict(data)
        return cls(base.estimate, base.low, base.high, base.n, 1, int(data.get("only_a", 0)),
                   int(data.get("only_b", 0)), math.nan if (p := data.get("mcnemar_p", 1.0)) is None else float(p))

    def verdict(self, gain: str = "helped", loss: str = "hurt") -> str:
        """``helped``/``hurt`` when the interval excludes 0, otherwise "no difference
        detectable on N images (CI [lo, hi])", with the figure in points."""
        if math.isnan(self.estimate):
            return "not measurable (no images)"
        if self.excludes_zero():
            word = gain if self.estimate > 0 else loss
            return f"{word}: {self.estimate:+.1f} points {self.bounds} on {self.n} images"
        return f"no difference detectable on {self.n} images ({self.estimate:+.1f} points, CI {self.bounds})"


def _finite(value: float) -> float | None:
    """JSON-safe: None for nan/inf (strict parsers reject NaN)."""
    return None if value is None or not math.isfinite(value) else float(value)


def _strata(n: int, strata: Sequence[Any] | np.ndarray | None, merge: bool = True) -> np.ndarray:
    """int [n]: the stratum index of each image (one stratum when None); with ``merge``,
    strata of fewer than :data:`MIN_STRATUM` images are merged into one."""
    if strata is None:
        return np.zeros(n, dtype=np.int64)
    strata = np.asarray(strata)
    if strata.shape != (n,):
        raise ValueError(f"strata has shape {strata.shape}, expected ({n},)")
    index = np.unique(strata, return_inverse=True)[1].reshape(-1)
    small = np.bincount(index)[index] < MIN_STRATUM
    if merge and small.any():
        index = np.where(small, -1, index)
        index = np.unique(index, return_inverse=True)[1].reshape(-1)
    return index


def _percentiles(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _hits(values: Sequence[bool] | np.ndarray) -> np.ndarray:
    hits = np.asarray(values)
    if hits.ndim != 1:
        raise ValueError(f"expected a 0/1 vector [N], got shape {hits.shape}")
    return hits.astype(bool)


def proportion_interval(hits: Sequence[bool] | np.ndarray, strata: Sequence[Any] | np.ndarray | None = None, *,
                        resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """The share of true entries of ``hits`` [N] in percent, with its percentile bootstrap
    interval, resampled within each stratum (class) of ``strata`` [N]. nan without images."""
    hits = _hits(hits)
    n = len(hits)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    index = _strata(n, strata)
    size = np.bincount(index)
    right = np.bincount(index, weights=hits).astype(np.int64)
    rng = np.random.default_rng(seed)
    drawn = rng.binomial(size[None, :], right[None, :] / size[None, :], size=(resamples, len(size))).sum(axis=1)
    low, high = _percentiles(100.0 * drawn / n, level)
    return Interval(float(100.0 * right.sum() / n), low, high, n)


def macro_interval(hits: Sequence[bool] | np.ndarray, labels: Sequence[int] | np.ndarray, *,
                   resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """The mean over classes of per-class accuracy (percent), each class resampled within
    itself (classes are the unit here, so small ones are not merged: a class of one image
    adds no spread, and the interval is a lower bound of the real one)."""
    hits = _hits(hits)
    if len(hits) == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    index = _strata(len(hits), labels, merge=False)
    size = np.bincount(index)
    right = np.bincount(index, weights=hits).astype(np.int64)
    rng = np.random.default_rng(seed)
    drawn = rng.binomial(size[None, :], right[None, :] / size[None, :], size=(resamples, len(size)))
    low, high = _percentiles(100.0 * (drawn / size[None, :]).mean(axis=1), level)
    return Interval(100.0 * float((right / size).mean()), low, high, len(hits))


def mcnemar_p(only_a: int, only_b: int) -> float:
    """McNemar's exact two-sided p-value: ``only_a`` successes of ``only_a + only_b``
    discordant pairs under p = 1/2 (1.0 when there are none)."""
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_difference(hits_a: Sequence[bool] | np.ndarray, hits_b: Sequence[bool] | np.ndarray,
                      strata: Sequence[Any] | np.ndarray | None = None, *, resamples: int = RESAMPLES,
                      level: float = LEVEL, seed: int = SEED) -> Difference:
    """A - B in points on the same images (``hits_a[i]`` and ``hits_b[i]`` are image i's),
    with the paired percentile bootstrap (resampled within each stratum) and McNemar's test."""
    a, b = _hits(hits_a), _hits(hits_b)
    if a.shape != b.shape:
        raise ValueError(f"paired predictions differ in length: {a.shape} vs {b.shape}")
    n = len(a)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, 0)
    index = _strata(n, strata)
    size = np.bincount(index)
    only_a = np.bincount(index, weights=a & ~b, minlength=len(size)).astype(np.int64)
    only_b = np.bincount(index, weights=b & ~a, minlength=len(size)).astype(np.int64)
    cells = np.stack([only_a, only_b, size - only_a - only_b], axis=1) / size[:, None]
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(size, cells, size=(resamples, len(size)))  # [R, strata, 3]
    samples = 100.0 * (drawn[:, :, 0] - drawn[:, :, 1]).sum(axis=1) / n
    low, high = _percentiles(samples, level)
    first, second = int(only_a.sum()), int(only_b.sum())
    return Difference(100.0 * (first - second) / n, low, high, n, 1, first, second, mcnemar_p(first, second))


def paired_difference_over_seeds(hits_a: np.ndarray, hits_b: np.ndarray,
                                 strata: Sequence[Any] | np.ndarray | None = None, *, resamples: int = RESAMPLES,
                                 level: float = LEVEL, seed: int = SEED) -> Difference:
    """A - B in points on the same N images, each system run in S seeds (``hits_*[s, i]``:
    image i right in seed s). The estimate is the mean of the seeds' differences; the
    interval resamples images within each stratum, each with its S seeds (a cluster
    bootstrap: resampling (seed, image) pairs as independent draws would count one test
    image S times and narrow the interval). ``only_a``/``only_b`` count discordant
    (seed, image) pairs; McNemar's test assumes independent pairs, so ``p_value`` is nan."""
    a, b = np.asarray(hits_a, dtype=bool), np.asarray(hits_b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [seeds, images] arrays of one shape, got {a.shape} and {b.shape}")
    n = a.shape[1]
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, 0, 1, 0, 0, math.nan)
    per_image = (a.astype(np.float64) - b).mean(axis=0)  # [N]
    index = _strata(n, strata)
    rng = np.random.default_rng(seed)
    totals = np.zeros(resamples)
    for stratum in range(index.max() + 1):
        members = per_image[index == stratum]
        totals += members[rng.integers(0, len(members), size=(resamples, len(members)))].sum(axis=1)
    low, high = _percentiles(100.0 * totals / n, level)
    return Difference(100.0 * float(per_image.mean()), low, high, n, 1, int((a & ~b).sum()), int((b & ~a).sum()),
                      math.nan)


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """Area under the ROC curve of telling ``known`` scores (higher = more known) from
    ``unknown`` ones, ties counted half (the Mann-Whitney U statistic); nan if a side is empty."""
    return float(_auroc_rows(np.asarray(known, np.float64)[None], np.asarray(unknown, np.float64)[None])[0])


def _auroc_rows(known: np.ndarray, unknown: np.ndarray) -> np.ndarray:
    """AUROC of each row of known [R, P] against the same row of unknown [R, Q]."""
    p, q = known.shape[1], unknown.shape[1]
    if p == 0 or q == 0:
        return np.full(len(known), math.nan)
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([known, unknown], axis=1), axis=1)
    return (ranks[:, :p].sum(axis=1) - p * (p + 1) / 2) / (p * q)


def auroc_interval(known: Sequence[float] | np.ndarray, unknown: Sequence[float] | np.ndarray, *,
                   resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Interval:
    """AUROC (0..1) of ``known`` vs ``unknown`` scores with its percentile bootstrap
    interval, each group resampled within itself."""
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    estimate = auroc(known, unknown)
    n = len(known) + len(unknown)
    if math.isnan(estimate):
        return Interval(math.nan, math.nan, math.nan, n, 3)
    rng = np.random.default_rng(seed)
    samples = []
    for start in range(0, resamples, 250):  # bounded memory on large test sets
        rows = min(250, resamples - start)
        samples.append(_auroc_rows(known[rng.integers(0, len(known), (rows, len(known)))],
                                   unknown[rng.integers(0, len(unknown), (rows, len(unknown)))]))
    low, high = _percentiles(np.concatenate(samples), level)
    return Interval(estimate, low, high, n, 3)


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson's score interval of a proportion, in percent (Wilson, JASA 1927)."""
    from scipy.stats import norm

    if n == 0:
        return math.nan, math.nan
    z = float(norm.ppf(1 - (1 - level) / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * (centre - half), 100 * (centre + half)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of finite values."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 1) -> str:
    """``45.4 ± 2.1 (3 seeds)``, counting the seeds that have the figure."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    seeds = sum(v is not None and math.isfinite(v) for v in values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({seeds} {'seed' if seeds == 1 else 'seeds'})"
