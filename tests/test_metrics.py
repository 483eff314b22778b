"""Predictions and Table 2 metrics: checked against sklearn and torch, not against themselves."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score

from rp2k_dist.data.metadata import SHAPES, TYPES, UNKNOWN
from rp2k_dist.evaluation import (
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    Predictions,
    accuracy_table,
    confused_pairs,
    per_class_accuracy,
    top_k_accuracy,
)

C, N = 20, 300
TYPE_POOL = ["tobacco", "dairy", UNKNOWN, "beer", "liquor", "misc"]  # not in paper order
SHAPE_POOL = ["jar", "bottle", "can", UNKNOWN]


def _classes() -> list[dict]:
    classes = [
        {
            "index": c,
            "name": f"class {c}",
            "type": TYPE_POOL[c % len(TYPE_POOL)],
            "shape": SHAPE_POOL[c % len(SHAPE_POOL)],
            "counts": {"train": 10, "test": 2},
        }
        for c in range(C)
    ]
    del classes[7]["type"]  # a class without metadata reads "unknown"
    return classes


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, C)).astype(np.float32)
    labels = rng.integers(0, C - 1, size=N)  # class C-1 has no test samples
    logits[np.arange(N), labels] += rng.uniform(0, 3, size=N).astype(np.float32)  # better than chance
    keys = [f"s{i:04d}" for i in range(N)]
    return keys, labels, logits, _classes()


def _sklearn_percent(labels, logits, k) -> float:
    return 100 * top_k_accuracy_score(labels, logits, k=k, labels=np.arange(C))


def _expected_order(values: set[str], paper_order: tuple[str, ...]) -> list[str]:
    return [v for v in paper_order if v in values] + sorted(values - set(paper_order))


def test_group_rows_match_sklearn_on_each_subset(case):
    keys, labels, logits, classes = case
    table = accuracy_table(Predictions.from_logits(keys, labels, logits), classes)
    for system, rows in (("type", table.by_type), ("shape", table.by_shape)):
        group_of = np.array([c.get(system, UNKNOWN) for c in classes])[labels]
        assert [r.group for r in rows] == _expected_order(set(group_of), TYPES if system == "type" else SHAPES)
        assert sum(r.samples for r in rows) == N
        for row in rows:
            mask = group_of == row.group
            assert row.samples == mask.sum()
            assert row.top1 == pytest.approx(_sklearn_percent(labels[mask], logits[mask], 1))
            assert row.top5 == pytest.approx(_sklearn_percent(labels[mask], logits[mask], 5))
    assert table.overall.samples == N
    assert table.overall.top1 == pytest.approx(_sklearn_percent(labels, logits, 1))
    assert table.overall.top5 == pytest.approx(_sklearn_percent(labels, logits, 5))
    assert 0 < table.overall.top1 < table.overall.top5 <= 100  # percentages, not fractions


def test_rows_follow_the_papers_order_with_others_last(case):
    keys, labels, logits, classes = case
    table = accuracy_table(Predictions.from_logits(keys, labels, logits), classes)
    assert [r.group for r in table.by_type] == ["dairy", "liquor", "beer", "tobacco", "misc", "unknown"]
    assert [r.group for r in table.by_shape] == ["bottle", "can", "jar", "unknown"]


def test_macro_is_the_mean_of_per_class_accuracy_over_test_classes(case):
    keys, labels, logits, classes = case
    predictions = Predictions.from_logits(keys, labels, logits)
    table = accuracy_table(predictions, classes)
    present = np.unique(labels)
    for k, value in ((1, table.macro.top1), (5, table.macro.top5)):
        manual = np.mean([_sklearn_percent(labels[labels == c], logits[labels == c], k) for c in present])
        assert value == pytest.approx(manual)
    per_class = per_class_accuracy(predictions, C)
    assert per_class.shape == (C,) and math.isnan(per_class[C - 1])
    assert per_class[3] == pytest.approx(_sklearn_percent(labels[labels == 3], logits[labels == 3], 1) / 100)


def test_top_k_accuracy_is_a_fraction_and_nan_when_empty():
    topk = np.array([[1, 2], [0, 1], [2, 0]])
    labels = np.array([1, 1, 1])
    assert top_k_accuracy(labels, topk, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(labels, topk, 2) == pytest.approx(2 / 3)
    assert math.isnan(top_k_accuracy(np.array([], np.int64), np.zeros((0, 5), np.int64), 5))


def test_from_logits_equals_torch_topk_of_softmax(case):
    keys, labels, logits, _ = case
    predictions = Predictions.from_logits(keys, torch.as_tensor(labels), torch.as_tensor(logits))
    scores, topk = torch.softmax(torch.as_tensor(logits), dim=1).topk(5, dim=1)
    assert predictions.topk.dtype == np.int64 and predictions.scores.dtype == np.float32
    np.testing.assert_array_equal(predictions.topk, topk.numpy())
    np.testing.assert_allclose(predictions.scores, scores.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(predictions.labels, labels)
    assert predictions.keys == keys


def test_from_logits_clips_k_to_the_number_of_classes():
    predictions = Predictions.from_logits(["a", "b"], [0, 2], np.array([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]]))
    assert predictions.topk.shape == (2, 3)
    np.testing.assert_array_equal(predictions.topk, [[0, 1, 2], [2, 1, 0]])
    assert top_k_accuracy(predictions.labels, predictions.topk, 5) == 1.0


def test_concat_sorts_by_key_whatever_the_rank_order(case):
    keys, labels, logits, _ = case
    whole = Predictions.from_logits(keys, labels, logits)
    order = np.random.default_rng(1).permutation(N)
    parts = [whole.subset(order[rank::3]) for rank in range(3)]  # three "ranks", shuffled keys
    merged = Predictions.concat(parts)
    assert merged.keys == sorted(keys)
    for field in ("labels", "topk", "scores"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(whole, field))
    reversed_ranks = Predictions.concat(parts[::-1])
    assert reversed_ranks.keys == merged.keys
    np.testing.assert_array_equal(reversed_ranks.topk, merged.topk)


def test_concat_rejects_duplicate_keys(case):
    keys, labels, logits, _ = case
    part = Predictions.from_logits(keys[:10], labels[:10], logits[:10])
    with pytest.raises(ValueError, match="duplicate"):
        Predictions.concat([part, part.subset(np.array([3]))])


def test_parquet_round_trip_and_columns(case, tmp_path):
    keys, labels, logits, classes = case
    predictions = Predictions.from_logits(keys, labels, logits)
    path = tmp_path / "eval" / "predictions.parquet"
    predictions.to_parquet(path, classes)
    back = Predictions.read_parquet(path)
    assert back.keys == predictions.keys
    for field in ("labels", "topk", "scores"):
        np.testing.assert_array_equal(getattr(back, field), getattr(predictions, field))
        assert getattr(back, field).dtype == getattr(predictions, field).dtype

    table = pq.read_table(path)
    assert table.column_names == [
        "key", "true_class", "true_name", "type", "shape",
        "top5_classes", "top5_scores", "top5_names", "correct_top1", "correct_top5",
    ]
    assert table.schema.field("top5_classes").type == pa.list_(pa.int64())
    assert table.schema.field("top5_scores").type == pa.list_(pa.float32())
    row = table.slice(0, 1).to_pylist()[0]
    label = int(labels[0])
    assert row["true_class"] == label and row["true_name"] == f"class {label}"
    assert row["type"] == classes[label].get("type", UNKNOWN) and row["shape"] == classes[label]["shape"]
    assert row["top5_names"] == [f"class {c}" for c in predictions.topk[0]]
    assert row["correct_top1"] == (predictions.topk[0, 0] == label)
    assert row["correct_top5"] == (label in predictions.topk[0])
    assert np.mean(table.column("correct_top5").to_numpy()) == pytest.approx(_sklearn_percent(labels, logits, 5) / 100)


def test_empty_predictions_round_trip(tmp_path):
    empty = Predictions([], np.zeros(0), np.zeros((0, 5)), np.zeros((0, 5)))
    empty.to_parquet(tmp_path / "empty.parquet", _classes())
    back = Predictions.read_parquet(tmp_path / "empty.parquet")
    assert len(back) == 0 and back.topk.shape == (0, 5)


def test_confused_pairs_ordered_by_count_then_index():
    classes = [{"index": c, "name": name} for c, name in enumerate("abcd")]
    # (true, top-1): 0->1 x3, 2->1 x3, 0->2 x1, 1->0 x1, and correct ones
    pairs = [(0, 1)] * 3 + [(2, 1)] * 3 + [(0, 2), (1, 0), (0, 0), (2, 2), (3, 3)]
    labels = np.array([t for t, _ in pairs])
    top1 = np.array([p for _, p in pairs])
    topk = np.stack([top1, (top1 + 1) % 4, (top1 + 2) % 4], axis=1)
    predictions = Predictions([f"k{i}" for i in range(len(pairs))], labels, topk, np.ones(topk.shape))
    got = confused_pairs(predictions, classes)
    assert [(p["true"], p["predicted"], p["count"]) for p in got] == [(0, 1, 3), (2, 1, 3), (0, 2, 1), (1, 0, 1)]
    assert got[0] == {
        "true": 0, "true_name": "a", "true_product_name": "", "true_sku": "", "predicted": 1, "predicted_name": "b",
        "predicted_product_name": "", "predicted_sku": "", "count": 3, "share_of_true": 3 / 5,
    }
    assert got[1]["share_of_true"] == pytest.approx(3 / 4) and got[3]["share_of_true"] == 1.0
    assert len(confused_pairs(predictions, classes, top=2)) == 2


def test_markdown_has_every_group_and_the_papers_numbers(case):
    keys, labels, logits, classes = case
    table = accuracy_table(Predictions.from_logits(keys, labels, logits), classes)
    text = table.to_markdown(PAPER_TABLE2["resnet34"])
    lines = text.splitlines()
    assert lines[0] == ("| meta-category | samples | top-1 | 95 % CI | top-5 | 95 % CI | paper top-1 | paper top-5 |")
    for row in table.by_type + table.by_shape:
        assert any(line.startswith(f"| {row.group} | {row.samples} | {row.top1:.2f} |") for line in lines)
    assert lines.index("| **type** |  |  |  |  |  |  |  |") < lines.index("| **shape** |  |  |  |  |  |  |  |")
    overall = table.overall.interval(1)  # every figure with its bootstrap interval, in its own column
    assert overall.low <= table.overall.top1 <= overall.high
    assert f"| {table.overall.top1:.2f} | {overall.bounds} |" in next(line for line in lines if line.startswith("| average"))
    dairy = next(line for line in lines if line.startswith("| dairy |"))
    assert dairy.endswith("| 93.68 | 98.45 |")
    average = next(line for line in lines if line.startswith("| average"))
    assert average.endswith("| 95.18 | 99.01 |") and f"{table.overall.top5:.2f}" in average
    assert any(line.startswith("| macro") for line in lines)
    assert "paper" not in table.to_markdown().splitlines()[0]
    assert table.to_dict()["overall"]["top1"] == table.overall.top1


def test_paper_tables_are_consistent():
    assert set(PAPER_TABLE2["resnet34"]) == set(TYPES) | {"average"}
    for category in ("liquor", "cosmetics"):  # Table 3's general model is Table 2's ResNet-34
        assert PAPER_TABLE3["resnet34"][category] == PAPER_TABLE2["resnet34"][category]
    assert PAPER_TABLE4["from scratch"] == PAPER_TABLE2["resnet34"]["average"]
