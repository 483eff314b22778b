"""Seeds as an axis: runs of one preset that differ only in ``run.seed`` (named
``<name>-s0``, ``<name>-s1``, …, as ``rp2k train PRESET --seeds N`` writes them), their
figures as mean ± std, and a paired comparison of two runs or two groups of seeds.

``run.seed`` reaches model initialisation (``torch.manual_seed(seed + rank)``), the
epoch's data order (the chunk plan) and every sample's augmentation (seeded from the run
seed, the epoch and the key), so seeds measure the training's own spread, while the
bootstrap intervals of :mod:`rp2k_dist.evaluation.stats` measure the test set's.

Paired comparison (:func:`paired_comparison`): A - B in top-1 points on the test images
every run predicted. With seeds, run A-s<i> is paired with B-s<i>: the difference is the
mean of the seeds' differences, its interval the test set's spread of that mean, each image
resampled with all its seeds (:func:`~rp2k_dist.evaluation.stats.paired_difference_over_seeds`;
the seeds are repeated measurements of one test set, not more images).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import pandas as pd

from .. import run_folder
from ..evaluation.stats import Difference, format_mean_std, paired_difference, paired_difference_over_seeds

_SEED = re.compile(r"^(?P<group>.+)-s(?P<seed>\d+)$")


def seed_names(name: str, seeds: int) -> list[str]:
    """Run names of ``seeds`` runs of one preset: ``<name>-s0`` … ``<name>-s<seeds-1>``."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    return [f"{name}-s{seed}" for seed in range(seeds)]


def seed_group(name: str) -> tuple[str, int | None]:
    """(group, seed) of a run name: ``table2-s3`` -> ("table2", 3); a name without a seed
    suffix is its own group (seed None)."""
    match = _SEED.match(name)
    return (match["group"], int(match["seed"])) if match else (name, None)


def group_runs(names: Sequence[str]) -> dict[str, list[int]]:
    """Group -> positions in ``names`` of its runs, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for position, name in enumerate(names):
        groups.setdefault(seed_group(name)[0], []).append(position)
    return groups


def aggregate(values: Sequence[float]) -> str:
    """``mean ± std (N seeds)`` of one figure over a group's runs."""
    return format_mean_std(list(values))


@dataclass
class Comparison:
    """A - B in top-1 points on shared test images (the mean over paired seeds)."""

    a: str
    b: str
    pairs: list[tuple[str, str]]
    difference: Difference

    def sentence(self) -> str:
        seeds = f", mean of {len(self.pairs)} seed pairs" if len(self.pairs) > 1 else ""
        return f"{self.a} - {self.b} (top-1, paired on the same test images{seeds}): {self.difference.verdict()}."


def _hits(run: Any) -> pd.Series:
    """Top-1 correctness by test key of a run (a :class:`~.report.Run`)."""
    frame = pd.read_parquet(BytesIO(run.folder.read_bytes(run_folder.PREDICTIONS)),
                            columns=["key", "true_class", "correct_top1"])
    return frame.set_index("key")


def paired_comparison(a_runs: Sequence[Any], b_runs: Sequence[Any], a: str, b: str) -> Comparison | None:
    """A - B over the runs of two groups, seed i of A paired with seed i of B (runs without
    a seed pair in order); None when no pair shares a test image."""
    def by_seed(runs: Sequence[Any]) -> dict[Any, Any]:
        seeds = [seed_group(r.name)[1] for r in runs]
        return dict(zip(seeds, runs)) if None not in seeds else dict(enumerate(runs))

    left, right = by_seed(a_runs), by_seed(b_runs)
    pairs = [(left[s], right[s]) for s in left if s in right] or list(zip(a_runs, b_runs))
    frames = [(_hits(run_a), _hits(run_b)) for run_a, run_b in pairs]
    shared = frames[0][0].index if frames else pd.Index([])
    for frame_a, frame_b in frames:
        shared = shared.intersection(frame_a.index).intersection(frame_b.index)
    if not len(shared):
        return None
    hits_a = np.stack([frame_a.loc[shared, "correct_top1"].to_numpy(bool) for frame_a, _ in frames])
    hits_b = np.stack([frame_b.loc[shared, "correct_top1"].to_numpy(bool) for _, frame_b in frames])
    labels = frames[0][0].loc[shared, "true_class"].to_numpy(np.int64)
    difference = (paired_difference(hits_a[0], hits_b[0], labels) if len(frames) == 1
                  else paired_difference_over_seeds(hits_a, hits_b, labels))
    return Comparison(a, b, [(run_a.name, run_b.name) for run_a, run_b in pairs], difference)
