"""Mid-epoch resume without Ray: the consumed-sample bitmap and the rest-of-epoch plan."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rp2k_dist.config import AugmentConfig, DataConfig
from rp2k_dist.data.chunks import plan_training_epoch
from rp2k_dist.data.epoch_state import ConsumedSamples, consumed_of, epoch_state, rest_of_epoch
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.transforms import TrainTransform
from rp2k_dist.input_spec import InputSpec
from tests.key_trace import KeyTrace, read_trace, trained_steps
from tests.test_loader import _table

SPEC = InputSpec(32, 36)


def test_bitmap_round_trips_through_a_weights_only_checkpoint():
    consumed = ConsumedSamples(350_000)
    consumed.mark(np.random.default_rng(0).choice(350_000, 120_000, replace=False))
    buffer = io.BytesIO()
    torch.save(epoch_state(1, 700, consumed), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert len(buffer.getvalue()) < 50_000  # one bit per sample: ~44 KB for RP2K's training split
    assert np.array_equal(consumed_of(state).mask, consumed.mask)
    with pytest.raises(ValueError, match="does not fit a split of 1000 samples"):
        ConsumedSamples.from_tensor(state["consumed"], 1000)


def test_checkpoint_names_sort_by_progress():
    from rp2k_dist.run_folder import checkpoint_dir_of

    names = [checkpoint_dir_of({"epoch": 1, "epoch_state": None}),
             checkpoint_dir_of({"epoch": 1, "epoch_state": {"global_step": 25}}),
             checkpoint_dir_of({"epoch": 1, "epoch_state": {"global_step": 130}}),
             checkpoint_dir_of({"epoch": 2})]
    assert names == sorted(names) == ["epoch_0001", "epoch_0001_step_0000025", "epoch_0001_step_0000130", "epoch_0002"]


def _planned_positions(table, world, workers, batch, epoch):
    """Each rank's steps and the split positions its readers plan (rest tables keep positions)."""
    steps, planned = [], []
    for rank in range(world):
        s, readers = plan_training_epoch(table, rank, world, workers, batch, epoch)
        steps.append(s)
        for reader in readers:
            assert sum(r.quota for r in readers) == s and reader.quota * batch <= reader.samples
            planned += [int(table.positions[p.first + i]) for p in reader.pieces for i in range(p.samples)]
    return steps, planned


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("workers", [0, 2, 8])
def test_rest_of_epoch_plans_every_unconsumed_sample_once_with_equal_steps(world, workers):
    table = _table([50, 3, 170, 9, 400, 1, 220, 64], chunk_bytes=200_000, seed=world)
    rng = np.random.default_rng(workers)
    consumed = ConsumedSamples(len(table))
    consumed.mark(rng.choice(len(table), len(table) // 3, replace=False))  # as a run at another world size left it
    rest = rest_of_epoch(table, consumed)
    batch = 4
    steps, planned = _planned_positions(rest, world, workers, batch, epoch=2)
    assert len(set(steps)) == 1  # equal on every rank, from the table and the bitmap alone
    unconsumed = set(np.flatnonzero(~consumed.mask).tolist())
    assert len(planned) == len(set(planned)) == len(unconsumed) and set(planned) == unconsumed
    readers = world * max(1, workers)
    # the steps train all of the rest except at most a partial batch per reader and the rank imbalance
    if steps[0]:
        assert len(unconsumed) - steps[0] * world * batch <= readers * batch + world * max(1, workers) * batch
    # the pieces of the rest read no more than the rest's byte windows
    bytes_read = sum(p.length for rank in range(world)
                     for r in plan_training_epoch(rest, rank, world, workers, batch, 2)[1] for p in r.pieces)
    assert bytes_read <= table.bytes + readers * table.chunk_bytes


def test_rest_of_a_fully_consumed_epoch_has_no_steps():
    table = _table([10, 10], sample_bytes=1000)
    consumed = ConsumedSamples(len(table), np.ones(len(table), bool))
    assert plan_training_epoch(rest_of_epoch(table, consumed), 0, 2, 2, 4)[0] == 0


def test_trained_steps_keep_the_replayed_steps_of_the_resumed_attempt():
    lines = ([{"origin": 0, "step": s, "keys": [f"a{s}"]} for s in (1, 2, 3, 4, 5)]  # killed after step 5
             + [{"origin": 3, "step": s, "keys": [f"b{s}"]} for s in (4, 5, 6)])  # resumed from step 3
    steps = trained_steps(lines)
    assert {s: [k for line in v for k in line["keys"]] for s, v in steps.items()} == {
        1: ["a1"], 2: ["a2"], 3: ["a3"], 4: ["b4"], 5: ["b5"], 6: ["b6"]}


def _loaders(manifest, world, workers, batch=4):
    return [ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                        LoaderConfig(DataConfig(batch_size=batch, loader_workers=workers, shuffle_buffer=16)), rank, world)
            for rank in range(world)]


@pytest.mark.parametrize("new_world,new_workers", [(2, 0), (3, 2), (1, 0)])
def test_loader_resumes_an_epoch_at_another_world_size_without_repeating_a_sample(many_shards, new_world, new_workers):
    """Two ranks stop after 3 steps of epoch 1; the run resumes on ``new_world`` ranks."""
    first = _loaders(many_shards, 2, 2)
    consumed = ConsumedSamples(len(first[0].consumed))
    done: list[str] = []
    for loader in first:
        loader.set_epoch(1)
        for step, batch in enumerate(loader):
            done += batch["key"]
            if step == 2:
                break
        consumed.update(loader.consumed)
    assert consumed.count == len(done) == len(set(done)) == 2 * 3 * 4
    assert set(first[0].positions(done)) == set(np.flatnonzero(consumed.mask).tolist())
    rest_steps, rest = [], []
    for loader in _loaders(many_shards, new_world, new_workers):
        loader.set_epoch(1, consumed)
        batches = list(loader)
        assert len(batches) == len(loader)
        rest_steps.append(len(batches))
        rest += [k for b in batches for k in b["key"]]
        assert loader.consumed.count == consumed.count + len(batches) * 4
    assert len(set(rest_steps)) == 1 and rest_steps[0] > 0
    assert len(rest) == len(set(rest)) and not set(rest) & set(done)
    train = len(first[0].dataset.table)
    readers = new_world * max(1, new_workers)
    assert train - len(done) - len(rest) <= 2 * readers * 4  # partial batches and rank imbalance only
    # the next epoch plans the whole split again
    loader = _loaders(many_shards, new_world, new_workers)[0]
    loader.set_epoch(1, consumed)
    loader.set_epoch(2)
    assert len(loader) == plan_training_epoch(loader.dataset.table, 0, new_world, new_workers, 4, 2)[0]


def _trace_by_step(folder):
    return {s: [k for line in lines for k in line["keys"]] for s, lines in trained_steps(read_trace(folder)).items()}


def test_engine_resumes_from_a_mid_epoch_checkpoint_at_the_exact_step(synth_shards, tmp_path):
    """One process: checkpoints every 3 steps; the run resumes from the one at step 3."""
    from rp2k_dist.config import load_config
    from rp2k_dist.run_folder import CHECKPOINT, checkpoint_dirs, load_checkpoint
    from rp2k_dist.engine.context import LocalContext
    from rp2k_dist.engine.train import train_worker
    from rp2k_dist.storage import RunStorage
    from tests.conftest import tiny_run_overrides

    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "steps", 1) + ["run.checkpoint_every_steps=3"])
    storage = RunStorage(config.run.storage_path, config.run.name)
    train_worker(config, LocalContext(storage, "cpu", keep=100), observers=[KeyTrace(tmp_path / "trace-full")])
    full = _trace_by_step(tmp_path / "trace-full")
    steps = len(full)
    names = checkpoint_dirs(storage)
    assert names == [f"epoch_0000_step_{s:07d}" for s in range(3, steps, 3)] + ["epoch_0001"]
    mid = load_checkpoint(storage.read_bytes(f"epoch_0000_step_0000003/{CHECKPOINT}"))
    assert mid["epoch"] == 0 and mid["scheduler"]["last_epoch"] == 3 and mid["metrics"] == []
    first3 = [k for s in (1, 2, 3) for k in full[s]]
    consumed = consumed_of(mid["epoch_state"])
    train = ShardLoader(synth_shards, "train", TrainTransform(SPEC, AugmentConfig()), LoaderConfig(DataConfig(batch_size=16, loader_workers=0)))
    assert set(np.flatnonzero(consumed.mask).tolist()) == set(train.positions(first3))
    assert consumed.count == 3 * 16

    for name in names[1:]:  # the run stopped right after step 3's checkpoint
        storage.delete_dir(name)
    final = train_worker(config, LocalContext(storage, "cpu", keep=100), observers=[KeyTrace(tmp_path / "trace-resumed")])
    resumed_lines = read_trace(tmp_path / "trace-resumed")
    assert {line["origin"] for line in resumed_lines} == {3}
    assert [line["step"] for line in resumed_lines] == list(range(4, 4 + len(resumed_lines)))
    rest = [k for line in resumed_lines for k in line["keys"]]
    epoch_keys = first3 + rest
    assert len(epoch_keys) == len(set(epoch_keys))  # no sample twice in the interrupted epoch
    uninterrupted = {k for keys in full.values() for k in keys}
    assert len(set(epoch_keys) ^ uninterrupted) <= 16  # differs by at most one global batch
    assert final["resumed_from_step"] == 3
    end = load_checkpoint(storage.read_bytes(f"epoch_0001/{CHECKPOINT}"))
    assert end["scheduler"]["last_epoch"] == 3 + len(resumed_lines) and end.get("epoch_state") is None
