"""The streaming loader: equal steps on every rank, no sample twice, exactly-once evaluation."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from rp2k_dist.config import DataConfig
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.chunks import SampleTable, plan_epoch, plan_training_epoch
from rp2k_dist.data.batching import _class_balanced_batches
from rp2k_dist.data.loader import CorruptDataError, LoaderConfig, ShardLoader
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.transforms import EvalTransform, InputSpec, TrainTransform
from rp2k_dist.errors import ConfigError, ManifestError

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


def test_chunk_order_is_epoch_seeded(many_shards):
    table = SampleTable.from_manifest(many_shards, "train")
    a0 = plan_epoch(table, 1, 1, epoch=0, seed=0)[0].pieces
    a1 = plan_epoch(table, 1, 1, epoch=1, seed=0)[0].pieces
    assert a0 == plan_epoch(table, 1, 1, epoch=0, seed=0)[0].pieces
    assert a0 != a1 and sorted(a0, key=lambda p: p.first) == sorted(a1, key=lambda p: p.first)
    _, keys0 = _train_epoch(many_shards, 1, 0, epoch=0)
    _, keys0b = _train_epoch(many_shards, 1, 0, epoch=0)
    _, keys1 = _train_epoch(many_shards, 1, 0, epoch=1)
    assert keys0 == keys0b and keys0 != keys1


def test_plan_quotas_add_up_for_uneven_shards():
    table = _table([50, 3, 17, 9, 40, 1, 22], sample_bytes=1000, chunk_bytes=8000)
    for world in (1, 2, 3):
        for workers in (0, 1, 2, 4):
            per_rank = []
            for rank in range(world):
                steps, readers = plan_training_epoch(table, rank, world, workers, batch_size=4, epoch=3)
                assert sum(r.quota for r in readers) == steps
                assert all(r.quota <= r.samples // 4 for r in readers)
                per_rank.append(steps)
            assert len(set(per_rank)) == 1


def _corrupt_copy(manifest, tmp_path, bad_keys):
    """A copy of ``manifest``'s dataset whose samples ``bad_keys`` hold garbage JPEG bytes,
    written in place (same length: the byte ranges of ``index.parquet`` still hold)."""
    import shutil
    import tarfile

    out = tmp_path / "corrupt"
    shutil.copytree(manifest.root, out)
    for shard in manifest.shards("train"):
        with tarfile.open(out / shard.name) as tar:
            spans = [(m.offset_data, m.size) for m in tar if m.name.endswith(".jpg") and m.name[:-4] in bad_keys]
        with open(out / shard.name, "r+b") as handle:
            for offset, size in spans:
                handle.seek(offset)
                handle.write(b"\xff\xd8not a jpeg".ljust(size, b"!"))
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
    with pytest.raises(ConfigError, match="batch_size"):
        LoaderConfig(DataConfig(batch_size=0))
    with pytest.raises(ConfigError, match="max_corrupt_fraction"):
        LoaderConfig(DataConfig(max_corrupt_fraction=2))
    with pytest.raises(ValueError, match="start_method"):
        LoaderConfig(start_method="teleport")


def test_batch_larger_than_the_split_is_a_clear_error(many_shards):
    with pytest.raises(ConfigError, match="lower data.batch_size"):
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
def test_a_full_epoch_of_pk_batches_has_distinct_images_and_pairs_in_every_class(many_shards, workers):
    steps = []
    for rank in range(2):
        loader = ShardLoader(many_shards, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=99, loader_workers=workers, shuffle_buffer=8)), rank, 2,
                             class_balanced=(3, 4))
        loader.set_epoch(1)
        batches = list(loader)
        steps.append(len(batches))
        for batch in batches:
            assert len(set(batch["key"])) == len(batch["key"]) == batch["image"].shape[0]
            counts = Counter(batch["label"].tolist())
            assert len(counts) == 3 and all(2 <= n <= 4 for n in counts.values())
    assert steps[0] == steps[1] > 0


def test_pk_rule_classes_short_of_k_give_what_they_hold_and_single_images_wait():
    # class 0: 8 images, 1: 3, 2: 5, 3: 1 (never pairable), in a stream order that makes 1 and 2 ready early
    stream = [(f"img{c}-{i}", c, f"{c}-{i}") for c, n in ((1, 3), (2, 5), (0, 8), (3, 1)) for i in range(n)]
    batches = list(_class_balanced_batches(iter(stream), 2, 4, np.random.default_rng(0)))
    used = [key for _, _, keys in batches for key in keys]
    assert len(used) == len(set(used))  # every image at most once per pass
    for images, labels, keys in batches:
        counts = Counter(labels)
        assert len(counts) == 2 and all(2 <= n <= 4 for n in counts.values())
        assert [f"img{k}" for k in keys] == images
    assert 3 not in {label for _, labels, _ in batches for label in labels}
    # class 1 has 3 images: it joins a batch with all 3 (never copies, never 4)
    assert {n for _, labels, _ in batches for c, n in Counter(labels).items() if c == 1} <= {2, 3}


def test_shards_behind_a_uri_stream_through_pyarrow_fs(many_shards):
    """Object-store shards (s3://, gs://) go through pyarrow.fs; file:// takes the same path."""
    remote = Manifest.load(f"file://{many_shards.root}")
    assert remote.shard_paths("test")[0].startswith("file://")
    assert remote.index().num_rows == many_shards.index().num_rows
    keys = lambda m: [k for b in ShardLoader(m, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=4, loader_workers=0)), train=False)
                      for k in b["key"]]
    assert keys(remote) == keys(many_shards)


def _table(samples_per_shard, sample_bytes=None, chunk_bytes=4_000_000, seed=0) -> SampleTable:
    """A split of ``len(samples_per_shard)`` shards with tar-like byte ranges (no files)."""
    rng = np.random.default_rng(seed)
    shard, offset, length = [], [], []
    for s, n in enumerate(samples_per_shard):
        sizes = np.full(n, sample_bytes) if sample_bytes else rng.integers(20_000, 60_000, n) // 512 * 512
        shard.append(np.full(n, s))
        offset.append(np.concatenate([[0], np.cumsum(sizes)[:-1]]))
        length.append(sizes)
    return SampleTable([f"s3://b/train-{s:06d}.tar" for s in range(len(samples_per_shard))],
                       np.concatenate(shard), np.concatenate(offset), np.concatenate(length), chunk_bytes)


def _rows(plan) -> np.ndarray:
    return np.concatenate([np.arange(p.first, p.first + p.samples) for p in plan.pieces] or [np.zeros(0, int)])


@pytest.mark.parametrize("shards", [1, 2, 7, 60, 256, 1000])
def test_plan_reads_each_byte_once_at_any_world_size(shards):
    """Planned bytes <= 1.05 x the split + one chunk per reader, equal steps, no sample twice,
    evaluation exactly once: world sizes 1-64 x loader workers 0-8 (pure planning)."""
    rng = np.random.default_rng(shards)
    table = _table(rng.integers(30, 60, shards) if shards > 60 else rng.integers(200, 400, shards), seed=shards)
    chunk = table.chunk_bytes
    for world in (1, 2, 3, 4, 7, 8, 16, 32, 64):
        for workers in (0, 1, 2, 3, 8):
            readers = world * max(1, workers)
            batch = max(1, min(16, len(table) // (2 * readers)))
            train = [plan_training_epoch(table, r, world, workers, batch, epoch=5) for r in range(world)]
            steps = {s for s, _ in train}
            assert len(steps) == 1
            plans = [p for _, rank in train for p in rank]
            assert all(sum(p.quota for p in rank) == s for s, rank in train)
            assert all(p.quota <= p.samples // batch for p in plans)
            rows = np.concatenate([_rows(p) for p in plans])
            assert len(rows) == len(np.unique(rows)) == len(table)
            planned = sum(p.bytes for p in plans)
            assert planned <= 1.05 * table.bytes + readers * chunk
            assert planned == table.bytes  # exact: no reader walks bytes it does not keep
            # ranges are the rows' own: every piece spans exactly its samples' tar members
            for p in plans[:: max(1, len(plans) // 8)]:
                for piece in p.pieces:
                    last = piece.first + piece.samples - 1
                    assert piece.offset == table.offset[piece.first]
                    assert piece.offset + piece.length == table.offset[last] + table.length[last]
                    assert piece.length <= chunk + 60_000
            evaluation = [p for r in range(world) for p in plan_epoch(table, world, workers, shuffle=False, rank=r)]
            seen = np.concatenate([_rows(p) for p in evaluation])
            assert np.array_equal(np.sort(seen), np.arange(len(table)))


def test_loader_reads_each_shard_byte_once_at_world_3_with_2_workers(few_shards):
    """Bytes actually read (counted in the storage layer, in the loader workers) <= 1.05 x."""
    split_bytes = sum(s.bytes for s in few_shards.shards("train"))
    assert len(few_shards.shards("train")) == 2
    read, keys = 0, []
    for rank in range(3):
        loader = ShardLoader(few_shards, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=4, loader_workers=2, shuffle_buffer=16, chunk_mb=0.05)), rank, 3)
        keys += [k for b in loader for k in b["key"]]
        read += loader.stats.bytes_read
    assert len(keys) == len(set(keys)) > 0
    assert 0.9 * split_bytes <= read <= 1.05 * split_bytes


def test_a_pack_without_byte_ranges_is_a_clear_error(many_shards, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    out = tmp_path / "old"
    shutil.copytree(many_shards.root, out)
    table = pq.read_table(out / "index.parquet")
    pq.write_table(table.drop_columns(["offset", "length"]), out / "index.parquet")
    with pytest.raises(ManifestError, match="no byte ranges") as error:
        ShardLoader(Manifest.load(out), "test", EvalTransform(SPEC), LoaderConfig(DataConfig(loader_workers=0)), train=False)
    assert "rp2k pack" in error.value.hint


# --- augmentation: a function of (run seed, epoch, pass, sample key) only ---------------------------------------


def _augmented(manifest, world, workers=0, epoch=0, seed=0, consumed=None, stop_after=None):
    """``{key: augmented uint8 CHW pixels}`` of one training epoch over all ``world`` ranks, and
    the epoch's consumed samples; ``stop_after``: each rank stops after that many batches."""
    pixels, done = {}, None
    for rank in range(world):
        loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=4, loader_workers=workers, shuffle_buffer=16), seed=seed),
                             rank, world)
        loader.set_epoch(epoch, consumed)
        for step, batch in enumerate(loader, 1):  # a batch handed out counts as consumed
            for key, image in zip(batch["key"], batch["image"]):
                assert key not in pixels
                pixels[key] = image.numpy().copy()
            if step == stop_after:
                break
        done = loader.consumed if done is None else (done.update(loader.consumed) or done)
    return pixels, done


def test_a_samples_augmentation_is_bit_identical_at_world_size_1_and_2(many_shards):
    train_keys = {r["key"] for r in many_shards.index().to_pylist() if r["split"] == "train"}
    one, _ = _augmented(many_shards, world=1, workers=0)
    two, _ = _augmented(many_shards, world=2, workers=2)  # other ranks, other loader workers, other batches
    assert one.keys() == two.keys() == train_keys  # batch 4 divides every reader's samples: all trained
    differ = [k for k in one if not np.array_equal(one[k], two[k])]
    assert not differ, f"{len(differ)} of {len(one)} samples augmented differently, e.g. {differ[:3]}"
    # and the draws are random: another run seed gives other pixels for (nearly) every sample
    other, _ = _augmented(many_shards, world=1, seed=1)
    assert sum(np.array_equal(one[k], other[k]) for k in one) <= len(one) // 20


def test_each_epoch_augments_a_sample_anew(many_shards):
    first, _ = _augmented(many_shards, world=1, epoch=0)
    again, _ = _augmented(many_shards, world=1, epoch=0)
    second, _ = _augmented(many_shards, world=1, epoch=1)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    same = sum(np.array_equal(first[k], second[k]) for k in first)
    assert same <= len(first) // 20, f"{same} of {len(first)} samples kept epoch 0's augmentation in epoch 1"


def test_a_mid_epoch_resume_at_another_world_size_augments_the_rest_as_before(many_shards):
    from rp2k_dist.data.epoch_state import ConsumedSamples

    whole, _ = _augmented(many_shards, world=1, epoch=2)
    before, consumed = _augmented(many_shards, world=2, epoch=2, stop_after=5)  # 2 workers, stopped after 5 steps
    assert consumed.count == len(before) == 2 * 5 * 4
    saved = ConsumedSamples.from_tensor(consumed.to_tensor(), len(consumed))  # as a step checkpoint holds it
    rest, _ = _augmented(many_shards, world=1, epoch=2, consumed=saved)  # resumed on one worker
    assert not before.keys() & rest.keys()
    assert before.keys() | rest.keys() == whole.keys()
    for part in (before, rest):
        assert all(np.array_equal(image, whole[key]) for key, image in part.items())


def test_a_sample_read_again_by_a_top_up_pass_is_augmented_anew(many_shards, tmp_path):
    train_keys = sorted(r["key"] for r in many_shards.index().to_pylist() if r["split"] == "train")
    manifest = _corrupt_copy(many_shards, tmp_path, set(train_keys[:3]))  # 3 skips leave the rank a batch short
    loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                         LoaderConfig(DataConfig(batch_size=4, loader_workers=0, max_corrupt_fraction=0.5)))
    loader.set_epoch(0)
    seen, again = {}, 0
    for batch in loader:
        for key, image in zip(batch["key"], batch["image"]):
            if key in seen:
                again += 1
                assert not np.array_equal(seen[key], image.numpy()), key
            seen[key] = image.numpy().copy()
    assert again > 0  # the top-up pass ran


def test_augment_seed_is_stable_and_depends_on_each_input():
    from rp2k_dist.data.augment import augment_seed

    # pinned: a sample's seed must not change between processes or releases (resumed runs)
    assert augment_seed(0, 3, 0, "train-0000007") == 17599035781740696894
    assert len({augment_seed(0, 3, 0, "train-0000007"), augment_seed(0, 3, 1, "train-0000007"),
                augment_seed(0, 4, 0, "train-0000007"), augment_seed(1, 3, 0, "train-0000007"),
                augment_seed(0, 3, 0, "train-0000008")}) == 5
