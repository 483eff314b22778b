"""A node drain notice in the engine (one process; the Ray path is tests/test_ray_elastic.py)."""

from __future__ import annotations

import time

from rp2k_dist.config import load_config
from rp2k_dist.data.epoch_state import consumed_of
from rp2k_dist.engine.context import DrainNotice, LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.run_folder import CHECKPOINT, checkpoint_dirs, load_checkpoint, read_metrics, read_preemptions
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides


class DrainedAt(LocalContext):
    """A context whose node is drained from the ``at``-th check on (checked every step)."""

    def __init__(self, storage, at: int, deadline_s: float | None):
        super().__init__(storage, "cpu", keep=100)
        self.at, self.deadline_s, self.checks = at, deadline_s, 0

    def drain_notice(self):
        self.checks += 1
        if self.checks < self.at:
            return None
        deadline = None if self.deadline_s is None else int((time.time() + self.deadline_s) * 1000)
        return DrainNotice(deadline, ["node-a"], [0])


def test_a_drain_notice_writes_a_mid_epoch_checkpoint_once_and_records_it(synth_shards, tmp_path):
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "drained", epochs=1) + [
        "optim.global_batch=32", "run.preemption_check_steps=1"])
    storage = RunStorage(config.run.storage_path, config.run.name)
    context = DrainedAt(storage, at=3, deadline_s=120)
    final = train_worker(config, context)

    steps = synth_shards.num_samples("train") // 32
    assert context.checks == 3  # acted on once, then no more checks in this attempt
    assert checkpoint_dirs(storage) == ["epoch_0000_step_0000003", "epoch_0001"]
    (event,) = read_preemptions(storage)
    assert event["checkpoint"] == "epoch_0000_step_0000003" and event["global_step"] == 3
    assert event["consumed"] == 3 * 32 and event["node_ids"] == ["node-a"] and event["ranks"] == [0]
    assert 110 < event["seconds_left"] <= 120 and event["saved_before_deadline"] is True
    saved = load_checkpoint(storage.read_bytes(f"epoch_0000_step_0000003/{CHECKPOINT}"))
    assert consumed_of(saved["epoch_state"]).count == 3 * 32
    assert saved["scheduler"]["last_epoch"] == 3
    # training went on to the end of the run
    assert final["epoch"] == 1 and read_metrics(storage)[-1]["train_images"] == steps * 32
    assert final["accumulation_steps"] == 2 and final["micro_batch"] == 16


def test_no_check_no_notice(synth_shards, tmp_path):
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "quiet", epochs=1) + [
        "run.preemption_check_steps=0"])
    storage = RunStorage(config.run.storage_path, config.run.name)
    context = DrainedAt(storage, at=1, deadline_s=None)
    train_worker(config, context)
    assert context.checks == 0 and read_preemptions(storage) == []
    assert checkpoint_dirs(storage) == ["epoch_0001"]
