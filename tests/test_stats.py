"""Bootstrap intervals and paired differences: checked against the analytic interval, by
simulated coverage, and on the cases a verdict must get right."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rp2k_dist.evaluation.stats import (
    Difference,
    Interval,
    auroc,
    auroc_interval,
    macro_interval,
    mcnemar_p,
    mean_std,
    paired_difference,
    paired_difference_over_seeds,
    proportion_interval,
    wilson_interval,
)


def test_the_bootstrap_interval_of_a_binomial_case_matches_wilsons():
    hits = np.arange(200) < 140  # 70 % of 200
    interval = proportion_interval(hits)
    low, high = wilson_interval(140, 200)
    assert interval.estimate == 70.0 and interval.n == 200
    assert interval.low == pytest.approx(low, abs=1.5) and interval.high == pytest.approx(high, abs=1.5)
    assert interval.format() == f"70.0 [{interval.low:.1f}, {interval.high:.1f}]"


def test_the_interval_covers_the_true_accuracy_in_95_percent_of_draws():
    rng = np.random.default_rng(7)
    covered = 0
    for draw in range(200):
        hits = rng.random(300) < 0.62
        interval = proportion_interval(hits, resamples=1000, seed=draw)
        covered += interval.low <= 62.0 <= interval.high
    assert covered >= 186, covered  # >= 93 % of 200


def test_stratified_resampling_keeps_class_counts_and_merges_tiny_classes():
    # two classes of 50: one always right, one always wrong; stratified, nothing can move
    labels = np.repeat([0, 1], 50)
    hits = labels == 0
    assert proportion_interval(hits, labels).bounds == "[50.0, 50.0]"
    assert proportion_interval(hits).high > 55  # unstratified, the class mix moves
    # classes of one image each are resampled together, not frozen at their one outcome
    singles = proportion_interval(np.arange(40) % 2 == 0, np.arange(40))
    assert singles.high - singles.low > 20
    macro = macro_interval(hits, labels)
    assert (macro.estimate, macro.low, macro.high) == (50.0, 50.0, 50.0)
    # many tiny classes and a few large ones: the macro interval still holds its estimate
    rng = np.random.default_rng(2)
    mixed = np.concatenate([np.arange(30), np.repeat(np.arange(30, 34), 25)])
    right = rng.random(len(mixed)) < np.where(mixed < 30, 0.2, 0.9)
    macro = macro_interval(right, mixed)
    assert macro.low <= macro.estimate <= macro.high


def test_a_paired_difference_of_identical_predictions_is_exactly_zero():
    hits = np.random.default_rng(0).random(500) < 0.4
    same = paired_difference(hits, hits, np.arange(500) % 7)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert (same.only_a, same.only_b, same.p_value) == (0, 0, 1.0)
    assert same.verdict() == "no difference detectable on 500 images (+0.0 points, CI [0.0, 0.0])"


def test_a_planted_gain_is_detected_and_one_image_on_19_is_not():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 200)
    before = rng.random(200) < 0.5
    after = before.copy()
    after[np.flatnonzero(~before)[:30]] = True  # 30 images of 200 fixed: +15 points
    gain = paired_difference(after, before, labels)
    assert gain.estimate == 15.0 and gain.excludes_zero() and gain.low > 5
    assert gain.verdict().startswith("helped: +15.0 points [")
    assert gain.p_value < 1e-6 and gain.p_value == mcnemar_p(30, 0)
    assert paired_difference(before, after, labels).verdict().startswith("hurt: -15.0 points")
    small = np.arange(19) < 10
    one_more = small.copy()
    one_more[10] = True
    tie = paired_difference(one_more, small)
    assert not tie.excludes_zero() and tie.estimate == pytest.approx(100 / 19)
    assert tie.verdict().startswith("no difference detectable on 19 images (+5.3 points, CI [")


def test_a_difference_over_seeds_is_the_mean_of_the_seeds_and_repeating_a_seed_does_not_narrow_it():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 8, 300)
    a, b = rng.random((3, 300)) < 0.6, rng.random((3, 300)) < 0.5
    over = paired_difference_over_seeds(a, b, labels)
    per_seed = [paired_difference(a[s], b[s], labels).estimate for s in range(3)]
    assert over.estimate == pytest.approx(np.mean(per_seed)) and over.n == 300
    assert (over.only_a, over.only_b) == (int((a & ~b).sum()), int((b & ~a).sum()))
    assert over.low < over.estimate < over.high and math.isnan(over.p_value)
    # the same seed three times is one measurement of the test set: as wide as one seed's
    # interval, where resampling the 900 (seed, image) pairs as independent draws is ~1/sqrt(3) of it
    one = paired_difference(a[0], b[0], labels)
    tripled = paired_difference_over_seeds(np.stack([a[0]] * 3), np.stack([b[0]] * 3), labels)
    naive = paired_difference(np.tile(a[0], 3), np.tile(b[0], 3), np.tile(labels, 3))
    width = lambda d: d.high - d.low  # noqa: E731
    assert tripled.estimate == one.estimate
    assert width(tripled) == pytest.approx(width(one), rel=0.15)
    assert width(naive) < 0.7 * width(tripled)
    same = paired_difference_over_seeds(a, a, labels)
    assert (same.estimate, same.low, same.high) == (0.0, 0.0, 0.0)
    assert math.isnan(Difference.from_dict(json.loads(json.dumps(over.to_dict(), allow_nan=False))).p_value)
    with pytest.raises(ValueError, match="seeds, images"):
        paired_difference_over_seeds(a[0], b[0])


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 0) == pytest.approx(2 * 0.5 ** 5)
    assert mcnemar_p(3, 3) == 1.0


def test_auroc_and_its_interval():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.5  # ties count half
    rng = np.random.default_rng(1)
    known, unknown = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 100)
    interval = auroc_interval(known, unknown, resamples=500)
    assert interval.low < interval.estimate < interval.high and interval.high - interval.low < 0.2
    assert interval.format().startswith(f"{interval.estimate:.3f} [")  # three decimals for a 0..1 figure
    assert math.isnan(auroc_interval(known, []).estimate)


def test_intervals_round_trip_through_strict_json():
    empty = proportion_interval([])
    text = json.dumps(empty.to_dict(), allow_nan=False)  # nan is written as null
    assert json.loads(text) == {"estimate": None, "low": None, "high": None, "n": 0}
    assert math.isnan(Interval.from_dict(json.loads(text)).estimate) and empty.format() == "–"
    gain = paired_difference(np.ones(10, bool), np.zeros(10, bool))
    assert Difference.from_dict(json.loads(json.dumps(gain.to_dict()))) == gain


def test_mean_and_std_over_seeds():
    assert mean_std([40.0, 44.0, 48.0]) == (44.0, 4.0)
    assert mean_std([40.0]) == (40.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([float("nan")]))
