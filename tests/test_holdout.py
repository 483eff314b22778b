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


# -- by groups of near-duplicates -----------------------------------------------------------


def _burst_tree(root, classes: int = 6, bursts: int = 5, shots: int = 4, test_bursts: int = 2):
    """An RP2K tree whose photos come in bursts: each burst is one random pack face
    photographed ``shots`` times with a little noise and shift; classes differ only slightly
    in colour. Test photos are other bursts. Returns {train file name: burst id}."""
    from PIL import Image

    rng = np.random.default_rng(5)
    burst_of = {}
    for c in range(classes):
        tint = np.array([40 * c % 255, 90, 160], np.float32)
        for split, count in (("train", bursts), ("test", test_bursts)):
            folder = root / "all" / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for b in range(count):
                face = rng.random((12, 12, 3)) * 200
                for s in range(shots):
                    shift = rng.integers(0, 3, 2)
                    pixels = np.kron(face, np.ones((8, 8, 1)))[shift[0]:shift[0] + 88, shift[1]:shift[1] + 88]
                    pixels = np.clip(pixels * 0.8 + tint * 0.2 + rng.normal(0, 4, pixels.shape), 0, 255)
                    name = f"{split}{b:02d}_{s}.jpg"
                    Image.fromarray(pixels.astype(np.uint8)).save(folder / name, quality=92)
                    if split == "train":
                        burst_of[f"class{c}/{name}"] = (c, b)
    return burst_of


def test_the_group_split_keeps_bursts_whole_and_reads_like_test(tmp_path):
    """Planted bursts: by key, validation holds near-copies of trained images and a nearest-
    neighbour model reads it far above test; by groups, every burst lies wholly on one side
    and validation reads close to test."""
    from rp2k_dist.data.holdout import train_holdout
    from rp2k_dist.data.images import load_rgb
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k

    burst_of = _burst_tree(tmp_path / "rp2k")
    manifest = pack_dataset(scan_rp2k(tmp_path / "rp2k"), tmp_path / "shards",
                            PackConfig(shorter_side=64, workers=1, samples_per_shard=64))
    rows = manifest.index().to_pydict()
    train = [i for i, split in enumerate(rows["split"]) if split == "train"]
    test = [i for i, split in enumerate(rows["split"]) if split == "test"]
    bursts = [burst_of[rows["source"][i].split("/", 2)[-1]] for i in train]
    by_groups, by_key = train_holdout(rows, 0.2), train_holdout(rows, 0.2, by="key")
    assert by_groups.sum() == by_key.sum() == 6 * 4  # one burst of five per class, 20 %
    for burst in set(bursts):
        sides = {bool(held) for held, b in zip(by_groups, bursts) if b == burst}
        assert len(sides) == 1, f"burst {burst} split across train and validation"
    assert any(len({bool(h) for h, b in zip(by_key, bursts) if b == burst}) == 2 for burst in set(bursts))

    def pixels(i):
        return np.asarray(load_rgb(tmp_path / "rp2k" / rows["source"][i]).resize((16, 16)), np.float32).reshape(-1)

    features = {i: pixels(i) for i in train + test}
    labels = np.array(rows["label"])

    def accuracy(mask, queries):  # 1-nearest neighbour over the train images left in training
        fitted = [i for i, held in zip(train, mask) if not held]
        bank = np.stack([features[i] for i in fitted])
        right = [labels[fitted[int(np.argmin(((bank - features[q]) ** 2).sum(axis=1)))]] == labels[q] for q in queries]
        return 100 * float(np.mean(right))

    test_groups = accuracy(by_groups, test)
    val_groups = accuracy(by_groups, [i for i, held in zip(train, by_groups) if held])
    val_key = accuracy(by_key, [i for i, held in zip(train, by_key) if held])
    assert val_key > 95 and test_groups < 80, (val_key, test_groups)
    assert abs(val_groups - accuracy(by_key, test)) < abs(val_key - accuracy(by_key, test)) - 20
    # a dataset packed before hashes existed: single keys, as before
    legacy = {k: v for k, v in rows.items() if k != "phash"}
    assert np.array_equal(train_holdout(legacy, 0.2), by_key)
