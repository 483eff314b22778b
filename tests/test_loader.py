"""The streaming loader: equal steps on every rank, no sample twice, exactly-once evaluation."""

from __future__ import annotations

from collections import Counter

import pytest
import webdataset as wds

from rp2k_dist.config import DataConfig
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.loader import CorruptDataError, LoaderConfig, ShardLoader, plan_readers, plan_training_epoch
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.transforms import EvalTransform, InputSpec, TrainTransform

SPEC = InputSpec(32, 36)


def _train_epoch(manifest, world, workers, epoch=0, batch=4):
    steps, keys = [], []
    for rank in range(world):
        loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=batch, loader_workers=workers, shuffle_buffer=16)), rank, world)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader)
        assert all(b["image"].shape == (batch, 3, 32, 32) for b in batches)
        steps.append(len(batches))
        keys += [k for b in batches for k in b["key"]]
    return steps, keys


@pytest.mark.parametrize("packed", ["many_shards", "few_shards"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_training_steps_equal_on_every_rank_and_no_sample_twice(request, packed, world, workers):
    manifest = request.getfixturevalue(packed)
    steps, keys = _train_epoch(manifest, world, workers)
    assert len(set(steps)) == 1 and steps[0] > 0
    assert len(keys) == len(set(keys)) == steps[0] * world * 4
    train_keys = {r["key"] for r in manifest.index().to_pylist() if r["split"] == "train"}
    assert set(keys) <= train_keys
    # the waste is bounded: at most one partial batch per reader plus the rank imbalance
    assert len(keys) >= 0.5 * len(train_keys)


@pytest.mark.parametrize("packed", ["many_shards", "few_shards"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_sees_every_test_sample_exactly_once(request, packed, world, workers):
    manifest = request.getfixturevalue(packed)
    seen = Counter()
    for rank in range(world):
        loader = ShardLoader(manifest, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=4, loader_workers=workers)),
                             rank, world, train=False)
        batches = list(loader)
        assert len(batches) == len(loader)
        seen.update(k for b in batches for k in b["key"])
    test_keys = {r["key"] for r in manifest.index().to_pylist() if r["split"] == "test"}
    assert set(seen) == test_keys
    assert set(seen.values()) == {1}


def test_labels_match_the_manifest(many_shards):
    labels = {r["key"]: r["label"] for r in many_shards.index().to_pylist()}
    loader = ShardLoader(many_shards, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=5, loader_workers=0)), train=False)
    for batch in loader:
        assert batch["label"].tolist() == [labels[k] for k in batch["key"]]


def test_shard_order_is_epoch_seeded(many_shards):
    shards = [(s.name, s.samples) for s in many_shards.shards("train")]
    a0 = plan_readers(shards, 0, 1, 1, epoch=0, seed=0)[0].shards
    a1 = plan_readers(shards, 0, 1, 1, epoch=1, seed=0)[0].shards
    assert a0 == plan_readers(shards, 0, 1, 1, epoch=0, seed=0)[0].shards
    assert a0 != a1 and sorted(a0) == sorted(a1)
    _, keys0 = _train_epoch(many_shards, 1, 0, epoch=0)
    _, keys0b = _train_epoch(many_shards, 1, 0, epoch=0)
    _, keys1 = _train_epoch(many_shards, 1, 0, epoch=1)
    assert keys0 == keys0b and keys0 != keys1


def test_plan_quotas_add_up_for_uneven_shards():
    shards = [(f"s{i}", n) for i, n in enumerate([50, 3, 17, 9, 40, 1, 22])]
    for world in (1, 2, 3):
        for workers in (0, 1, 2, 4):
            per_rank = []
            for rank in range(world):
                steps, readers = plan_training_epoch(shards, rank, world, workers, batch_size=4, epoch=3)
                assert sum(r.quota for r in readers) == steps
                assert all(r.quota <= r.samples // 4 for r in readers)
                per_rank.append(steps)
            assert len(set(per_rank)) == 1


def _corrupt_copy(manifest, tmp_path, bad_keys):
    """A copy of ``manifest``'s dataset whose samples ``bad_keys`` hold garbage bytes."""
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(manifest.root, out)
    for shard in manifest.shards("train"):
        src = out / shard.name
        samples = list(wds.WebDataset(str(src), shardshuffle=False))
        with wds.TarWriter(str(src), encoder=False) as sink:
            for s in samples:
                record = {k: v for k, v in s.items() if k in ("__key__", "jpg", "cls", "json")}
                if s["__key__"] in bad_keys:
                    record["jpg"] = b"\xff\xd8not a jpeg"
                sink.write(record)
    return Manifest.load(out)


def test_corrupt_samples_are_counted_and_steps_stay_equal(many_shards, tmp_path):
    train_keys = sorted(r["key"] for r in many_shards.index().to_pylist() if r["split"] == "train")
    bad = set(train_keys[:3])
    manifest = _corrupt_copy(many_shards, tmp_path, bad)
    for world in (1, 2):
        skipped, steps = 0, []
        for rank in range(world):
            loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                                 LoaderConfig(DataConfig(batch_size=4, loader_workers=0, max_corrupt_fraction=0.5)), rank, world)
            keys = [k for b in loader for k in b["key"]]
            assert not bad & set(keys)
            steps.append(len(keys) // 4)
            skipped += loader.stats.skipped
        assert len(set(steps)) == 1
        assert 0 < skipped <= 3


def test_too_many_corrupt_samples_abort_with_a_clear_error(many_shards, tmp_path):
    train_keys = sorted(r["key"] for r in many_shards.index().to_pylist() if r["split"] == "train")
    manifest = _corrupt_copy(many_shards, tmp_path, set(train_keys[:12]))
    loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                         LoaderConfig(DataConfig(batch_size=4, loader_workers=0, max_corrupt_fraction=0.01)))
    with pytest.raises(CorruptDataError, match="could not be decoded.*rp2k verify"):
        list(loader)


def test_truncated_shard_is_survived_with_equal_steps(many_shards, tmp_path):
    import shutil

    out = tmp_path / "trunc"
    shutil.copytree(many_shards.root, out)
    victim = out / many_shards.shards("train")[0].name
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    manifest = Manifest.load(out)
    loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                         LoaderConfig(DataConfig(batch_size=4, loader_workers=0, max_corrupt_fraction=1.0)))
    batches = list(loader)
    assert len(batches) == len(loader)
    assert loader.stats.errors  # the tar error was recorded, not slept on


def test_config_validation():
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig(DataConfig(batch_size=0))
    with pytest.raises(ValueError, match="max_corrupt_fraction"):
        LoaderConfig(DataConfig(max_corrupt_fraction=2))
    with pytest.raises(ValueError, match="start_method"):
        LoaderConfig(start_method="teleport")


def test_batch_larger_than_the_split_is_a_clear_error(many_shards):
    with pytest.raises(ValueError, match="lower batch_size"):
        ShardLoader(many_shards, "train", TrainTransform(SPEC, AugmentConfig()), LoaderConfig(DataConfig(batch_size=1000, loader_workers=0)))


def test_class_subset_is_relabelled_and_counted_exactly(many_shards):
    keep = [4, 1]
    labels = {r["key"]: r["label"] for r in many_shards.index().to_pylist()}
    seen = Counter()
    for rank in range(2):
        loader = ShardLoader(many_shards, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=3, loader_workers=0)),
                             rank, 2, train=False, classes=keep)
        for batch in loader:
            assert batch["label"].tolist() == [keep.index(labels[k]) for k in batch["key"]]
            seen.update(batch["key"])
    expected = {k for k, v in labels.items() if v in keep and k.startswith("test")}
    assert set(seen) == expected and set(seen.values()) == {1}


@pytest.mark.parametrize("workers", [0, 2])
def test_class_balanced_batches_hold_p_classes_of_k_images(many_shards, workers):
    steps = []
    for rank in range(2):
        loader = ShardLoader(many_shards, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=99, loader_workers=workers, shuffle_buffer=8)), rank, 2,
                             class_balanced=(3, 4))
        batches = list(loader)
        steps.append(len(batches))
        for batch in batches:
            counts = Counter(batch["label"].tolist())
            assert len(counts) == 3 and set(counts.values()) == {4}
            assert batch["image"].shape[0] == 12
    assert steps[0] == steps[1] > 0


def test_uneven_shards_fall_back_to_balanced_sample_splitting():
    shards = [("big", 60), ("small", 2)]
    for rank in range(2):
        (plan,) = plan_readers(shards, rank, 2, workers=0, shuffle=False)
        assert plan.modulo == (2, rank) and plan.samples == 31
    steps, _ = plan_training_epoch(shards, 0, 2, workers=0, batch_size=16)
    assert steps == 1


def test_shards_behind_a_uri_stream_through_pyarrow_fs(many_shards):
    """Object-store shards (s3://, gs://) go through pyarrow.fs; file:// takes the same path."""
    remote = Manifest.load(f"file://{many_shards.root}")
    assert remote.shard_paths("test")[0].startswith("file://")
    assert remote.index().num_rows == many_shards.index().num_rows
    keys = lambda m: [k for b in ShardLoader(m, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=4, loader_workers=0)), train=False)
                      for k in b["key"]]
    assert keys(remote) == keys(many_shards)
