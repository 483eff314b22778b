"""Open-set scores: each equals its formula, the k-NN score rejects a far-away class, a
threshold chosen on validation is applied unchanged to test, and the files are strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from rp2k_dist.data.holdout import split_unseen
from rp2k_dist.evaluation.embeddings import Embedded
from rp2k_dist.evaluation.gallery import UNKNOWN, Gallery
from rp2k_dist.evaluation.ood_scores import (
    calibrate_threshold, choose, energy, far_at, fpr_at_tpr, fpr_interval, gallery, knn, max_logit, msp, score_row,
    scores_markdown,
)
from rp2k_dist.evaluation.openset import CATALOGUE, OpenSetResult, OpenSetRow, recall_at
from rp2k_dist.evaluation.stats import auroc

LOGITS = np.array([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 0.5]])


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_each_classifier_score_equals_its_formula():
    t = torch.tensor(LOGITS)
    assert np.allclose(msp(LOGITS), torch.softmax(t, dim=1).max(dim=1).values.numpy())
    assert msp(LOGITS)[1] == pytest.approx(1 / 3)
    assert np.array_equal(max_logit(LOGITS), [2.0, 0.0, 3.0])
    assert np.allclose(energy(LOGITS), torch.logsumexp(t, dim=1).numpy())  # -E(x) = T logsumexp(f / T), T = 1
    assert energy(LOGITS)[1] == pytest.approx(math.log(3))
    assert np.allclose(energy(LOGITS, temperature=2.0), 2.0 * torch.logsumexp(t / 2.0, dim=1).numpy())
    big = np.array([[1000.0, 0.0]])  # stable for large logits
    assert msp(big)[0] == pytest.approx(1.0) and energy(big)[0] == pytest.approx(1000.0)


def test_knn_and_gallery_scores_equal_their_formulas():
    rng = np.random.default_rng(0)
    bank, queries = _unit(rng.standard_normal((20, 8))), _unit(rng.standard_normal((5, 8)))
    distances = np.linalg.norm(queries[:, None, :] - bank[None, :, :], axis=2)  # Euclidean, by hand
    for k in (1, 5, 20):
        assert np.allclose(knn(queries, bank, k), -np.sort(distances, axis=1)[:, k - 1], atol=1e-5)
    assert np.allclose(gallery(queries, bank), (queries @ bank.T).max(axis=1), atol=1e-6)


def _clusters(rng, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    return _unit(centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1])))


def test_a_planted_far_away_class_is_rejected_by_the_knn_score():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 32))
    bank = _clusters(rng, centres[:5], 500, 0.3)  # the training set: five known classes, ~100 images each
    known = _clusters(rng, centres[:5], 100, 0.3)
    unknown = _clusters(rng, -centres[:1] + 3 * centres[5:], 60, 0.3)  # a class far from every known one
    for k in (1, 10, 50):
        assert auroc(knn(known, bank, k), knn(unknown, bank, k)) > 0.95


def test_a_threshold_chosen_on_validation_is_applied_unchanged_to_test():
    rng = np.random.default_rng(2)
    v_known, v_unknown = rng.normal(1.0, 1.0, 200), rng.normal(-1.0, 1.0, 80)
    t_known, t_unknown = rng.normal(1.0, 1.0, 150), rng.normal(0.0, 1.0, 60)
    strata = np.repeat([7, 8], 30)
    row = score_row("energy", None, v_known, v_unknown, t_known, t_unknown, strata)
    assert row.threshold == calibrate_threshold(v_known) and np.mean(v_known >= row.threshold) >= 0.95
    assert row.far == pytest.approx(100 * np.mean(t_unknown >= row.threshold))
    assert row.tar == pytest.approx(100 * np.mean(t_known >= row.threshold))
    assert row.validation_auroc == pytest.approx(auroc(v_known, v_unknown))
    assert row.auroc == pytest.approx(auroc(t_known, t_unknown))
    # another test set: the same threshold, other FAR
    other = score_row("energy", None, v_known, v_unknown, t_known + 5, t_unknown + 5, strata)
    assert other.threshold == row.threshold and other.far > row.far
    low, high = row.intervals["auroc"]
    assert low <= row.auroc <= high
    # FPR at 95 % TPR: on the test set's own known images
    cut = calibrate_threshold(t_known)
    assert row.fpr95 == pytest.approx(fpr_at_tpr(t_known, t_unknown)) == pytest.approx(
        100 * far_at(t_unknown, cut).mean())
    interval = fpr_interval(t_known, t_unknown)
    assert interval.low <= interval.estimate <= interval.high
    assert math.isnan(fpr_at_tpr(t_known, np.array([])))


def test_the_score_with_the_best_validation_auroc_is_chosen():
    rng = np.random.default_rng(3)
    known, unknown, strata = rng.normal(1, 1, 50), rng.normal(0, 1, 20), np.zeros(20)
    rows = [score_row("msp", None, known, unknown, known, unknown, strata),
            score_row("knn", 5, known + 3, unknown, known, unknown, strata),
            score_row("gallery", None, known, unknown + 1, known, unknown, strata)]
    best, reason = choose(rows)
    assert best.score == "knn" and "highest validation AUROC" in reason
    table = scores_markdown(rows, best.score)
    assert "knn (k=5) **(chosen)**" in table and f"{rows[0].auroc:.3f} [" in table
    empty = [score_row(r.score, r.k, known, unknown[:0], known, unknown, strata) for r in rows]
    best, reason = choose(empty)
    assert best.score == "gallery" and "no validation-unseen class" in reason


def test_validation_and_test_unseen_classes_are_disjoint_deterministic_and_stratified():
    classes = [{"index": i, "name": f"c{i}", "type": t} for i, t in
               enumerate(["liquor"] * 6 + ["beer"] * 4 + ["dairy"] * 2)]
    unseen = [0, 1, 2, 3, 6, 7, 10]
    validation, test = split_unseen(classes, unseen)
    assert not set(validation) & set(test) and sorted(validation + test) == unseen
    assert (validation, test) == split_unseen(list(classes), list(reversed(unseen)))
    assert abs(len(validation) - len(test)) <= 1 and len(test) >= len(validation)
    for kind in ("liquor", "beer"):  # every type with 2+ unseen classes is in both sets
        members = [c for c in unseen if classes[c]["type"] == kind]
        assert {c for c in members if c in validation} and {c for c in members if c in test}
    assert split_unseen(classes, [3]) == ([], [3])  # one class: a test set, no validation set


def test_catalogue_wide_recall_is_at_most_the_unseen_only_recall():
    rng = np.random.default_rng(4)
    centres = rng.standard_normal((12, 16))
    seen_gallery = _clusters(rng, centres[:8], 40, 0.5)
    seen_classes = np.argmax(seen_gallery @ _unit(centres[:8]).T, axis=1)
    unseen_gallery = _unit(centres[8:] + 0.5 * rng.standard_normal((4, 16)))
    unseen_classes = np.arange(8, 12)
    labels = rng.integers(8, 12, 50)
    queries = _unit(centres[labels] + 0.5 * rng.standard_normal((50, 16)))
    everything = np.concatenate([seen_gallery, unseen_gallery])
    classes = np.concatenate([seen_classes, unseen_classes])
    for k in (1, 5):
        alone = recall_at(queries, labels, unseen_gallery, unseen_classes, k)
        catalogue = recall_at(queries, labels, everything, classes, k)
        assert (catalogue <= alone).all()  # per query: more classes can only push the true one down
    assert recall_at(queries, labels, everything, classes, 1).mean() < recall_at(
        queries, labels, unseen_gallery, unseen_classes, 1).mean()


def test_openset_json_is_strict_json_with_null_for_undefined_figures():
    row = OpenSetRow("beer", 3, 0, 10, 0, 50.0, 80.0, {"r@1 1-shot": math.nan, f"{CATALOGUE}r@1 1-shot": None},
                     math.nan, math.nan, 90.0, {"auroc": [None, None]}, math.nan)
    result = OpenSetResult([row], 0.5, "test", [], 5, [{"score": "msp", "auroc": None}], "msp", None, "why", [], [1])
    text = result.to_json()  # json.dumps(..., allow_nan=False) succeeds
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"openset.json holds {c}"))
    assert data["rows"][0]["auroc"] is None and data["rows"][0]["recall"]["r@1 1-shot"] is None
    json.dumps(data, allow_nan=False)
    assert OpenSetResult.from_dict(data).to_markdown() == result.to_markdown()


def test_a_classifier_score_gallery_answers_an_added_sku_by_its_similarity():
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((6, 32))
    labels = np.repeat(np.arange(5), 4)
    table = pd.DataFrame({"key": [f"g{i}" for i in range(len(labels))], "split": "train", "class": labels,
                          "name": [f"sku{c}" for c in labels], "sku": [f"sku{c}" for c in labels],
                          "type": "liquor", "shape": "bottle"})
    vectors = np.concatenate([_clusters(rng, centres[[c]], 1, 0.05) for c in labels])
    built = Gallery.create(Embedded(table.assign(embedding=list(vectors)), [], "sha256:x"))
    built.score, built.threshold, built.similarity_threshold = "msp", 0.9, 0.8
    trained = set(range(5))
    new = _clusters(rng, centres[5:], 8, 0.05)
    flat = np.zeros((8, 5))  # the classifier has never seen the new product: msp 0.2 < 0.9
    before = [built.answer(m, float(s), trained) for m, s in zip(built.rank(new), msp(flat))]
    assert set(before) == {UNKNOWN}
    added = table.iloc[:4].assign(key=[f"n{i}" for i in range(4)], **{"class": -1, "name": "NEW", "sku": "NEW"})
    built.add(Embedded(added.assign(embedding=list(new[:4])), [], "sha256:x"))
    after = [built.answer(m, float(s), trained) for m, s in zip(built.rank(new[4:]), msp(flat[4:]))]
    assert after == ["NEW"] * 4  # judged by similarity (>= 0.8), not by the classifier
    sure = np.eye(5)[[2]] * 10  # a trained class is judged by the classifier's score
    assert built.answer(built.rank(_clusters(rng, centres[2:3], 1, 0.05))[0], float(msp(sure)[0]), trained) == "sku2"
