"""The validation split carved from train (data.holdout): which images, and that training
never sees them."""

from __future__ import annotations

import hashlib
from collections import Counter

import numpy as np
import pytest

from rp2k_dist.config import ConfigError, DataConfig, load_config
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.holdout import HOLDOUT, held_out_count, holdout_mask
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.transforms import EvalTransform, InputSpec, TrainTransform

SPEC = InputSpec(32, 36)


@pytest.mark.parametrize("n, fraction, expected", [(10, 0.1, 1), (24, 0.1, 2), (25, 0.1, 3), (5, 0.1, 1),
                                                   (4, 0.1, 0), (3, 0.4, 1), (2, 0.4, 0), (40, 0.0, 0)])
def test_held_out_count_rounds_and_keeps_two_in_train(n, fraction, expected):
    assert held_out_count(n, fraction) == expected


def test_the_mask_takes_the_lowest_key_hashes_of_each_class_in_any_order():
    keys = [f"img{i}" for i in range(12)]
    labels = [0] * 8 + [1] * 4
    mask = holdout_mask(keys, labels, 0.25)
    digest = {k: hashlib.blake2b(k.encode(), digest_size=8).digest() for k in keys}
    expected = set(sorted(keys[:8], key=digest.get)[:2]) | set(sorted(keys[8:], key=digest.get)[:1])
    assert {k for k, m in zip(keys, mask) if m} == expected
    order = np.random.default_rng(0).permutation(12)
    shuffled = holdout_mask([keys[i] for i in order], [labels[i] for i in order], 0.25)
    assert {keys[i] for i, m in zip(order, shuffled) if m} == expected
    with pytest.raises(ConfigError, match="data.holdout"):
        holdout_mask(keys, labels, 0.5)


def _keys(loader) -> Counter:
    seen = Counter()
    for batch in loader:
        seen.update(batch["key"])
    return seen


def test_training_leaves_out_the_holdout_split_which_any_class_subset_agrees_on(many_shards):
    rows = [r for r in many_shards.index().to_pylist() if r["split"] == "train"]
    data = DataConfig(batch_size=4, loader_workers=0, shuffle_buffer=16, holdout=0.2)
    held = _keys(ShardLoader(many_shards, HOLDOUT, EvalTransform(SPEC), LoaderConfig(data), train=False))
    assert set(held.values()) == {1}
    per_class = Counter(r["label"] for r in rows)
    assert len(held) == sum(held_out_count(n, 0.2) for n in per_class.values()) > 0
    train = ShardLoader(many_shards, "train", TrainTransform(SPEC, AugmentConfig()), LoaderConfig(data))
    train.set_epoch(0)
    trained = _keys(train)
    assert not set(trained) & set(held)
    assert len(train.dataset.table) == len(rows) - len(held)
    # a specialist's loader (classes 4 and 1) holds out the same images of its classes
    labels = {r["key"]: r["label"] for r in rows}
    mine = _keys(ShardLoader(many_shards, HOLDOUT, EvalTransform(SPEC), LoaderConfig(data), train=False, classes=[4, 1]))
    assert set(mine) == {k for k in held if labels[k] in (1, 4)}
    with pytest.raises(ConfigError, match="holdout split needs data.holdout > 0"):
        ShardLoader(many_shards, HOLDOUT, EvalTransform(SPEC), LoaderConfig(DataConfig(holdout=0.0)), train=False)


def test_holdout_out_of_range_names_the_key():
    with pytest.raises(ConfigError, match="data.holdout must be in"):
        load_config(None, ["data.holdout=0.5"])
