"""Exact mid-epoch resume on the shared local Ray cluster: a worker SIGKILLed inside an epoch.

The runs log the keys each rank trains at each step (a :class:`~tests.key_trace.KeyTrace`
step observer). A step trained again after the restart replaces the lost one
(:func:`~tests.key_trace.trained_steps`).
"""

from __future__ import annotations

import threading
import time

import pytest

from rp2k_dist.launch.trainer import read_metrics, run_training
from rp2k_dist.storage import RunStorage
from tests.key_trace import KeyTrace, read_trace, trained_steps
from tests.test_ray_train import _config, _kill_a_train_worker

pytestmark = pytest.mark.slow

EVERY = 2  # run.checkpoint_every_steps


@pytest.fixture(scope="module")
def traced_ray(ray_cluster, tmp_path_factory):
    """The shared cluster, and the folder the runs' key traces go to."""
    return tmp_path_factory.mktemp("trace")


def _train(config, trace):
    return run_training(config, observers=[KeyTrace(trace / config.run.name)])


def _run_config(shards, tmp_path, name, workers=2, failures=2):
    return _config(shards, tmp_path, name, epochs=1, extra=[f"run.workers={workers}", f"run.max_failures={failures}",
                                                             f"run.checkpoint_every_steps={EVERY}"])


def _epoch_keys(trace, name, epoch=0) -> list[str]:
    steps = trained_steps([line for line in read_trace(trace / name) if line["epoch"] == epoch])
    return [k for step in sorted(steps) for line in steps[step] for k in line["keys"]]


def _kill_after_a_mid_epoch_checkpoint(config, trace, killed: list[int]) -> threading.Thread:
    """SIGKILL a worker once the controller has registered a mid-epoch checkpoint and a
    later step has started training (so that step's work is lost)."""
    storage = RunStorage(config.run.storage_path, config.run.name)

    def registered_step() -> int:
        if not storage.exists("checkpoint_manager_snapshot.json"):
            return 0
        text = storage.read_bytes("checkpoint_manager_snapshot.json").decode()
        return max([int(part[:7]) for part in text.split("_step_")[1:]], default=0)

    started = time.time()

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            step = registered_step()
            traced = [line["step"] for line in read_trace(trace / config.run.name)] if (trace / config.run.name).exists() else []
            if step and max(traced, default=0) > step:
                _kill_a_train_worker(killed, started)
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _check_interrupted_epoch(trace, name, train_keys: list[str], global_batch: int) -> list[dict]:
    lines = read_trace(trace / name)
    origins = sorted({line["origin"] for line in lines})
    assert len(origins) == 2 and origins[1] > 0, origins  # one fresh start, one mid-epoch resume
    killed_last = max(line["step"] for line in lines if line["origin"] == origins[0])
    assert killed_last - origins[1] <= EVERY  # steps lost: at most one checkpoint interval
    keys = _epoch_keys(trace, name)
    assert len(keys) == len(set(keys))  # within the interrupted epoch no sample twice
    assert set(keys) <= set(train_keys)
    # as in an uninterrupted epoch, only the tail that does not fill a global batch is left out
    assert len(set(train_keys) - set(keys)) < global_batch
    return lines


@pytest.fixture(scope="module")
def train_keys(synth_shards) -> list[str]:
    """The keys of every training sample (the manifest's index)."""
    index = synth_shards.index()
    return [key for key, split in zip(index["key"].to_pylist(), index["split"].to_pylist()) if split == "train"]


def test_killed_worker_resumes_mid_epoch_at_the_same_world_size(traced_ray, synth_shards, tmp_path, train_keys):
    config = _run_config(synth_shards, tmp_path, "same")
    killed: list[int] = []
    watcher = _kill_after_a_mid_epoch_checkpoint(config, traced_ray, killed)
    final = _train(config, traced_ray)
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    lines = _check_interrupted_epoch(traced_ray, "same", train_keys, global_batch=2 * 16)
    assert {line["world_size"] for line in lines} == {2}
    assert final["resumed_from_step"] == max(line["origin"] for line in lines)
    assert [m["epoch"] for m in read_metrics(config)] == [1]  # the restarted epoch reported once


def test_killed_run_resumes_mid_epoch_at_another_world_size(traced_ray, synth_shards, tmp_path, train_keys):
    config = _run_config(synth_shards, tmp_path, "grow", failures=0)
    killed: list[int] = []
    watcher = _kill_after_a_mid_epoch_checkpoint(config, traced_ray, killed)
    with pytest.raises(Exception):
        _train(config, traced_ray)  # no restarts allowed: the run stops
    watcher.join(timeout=5)
    assert killed, "no worker was killed"
    final = _train(_run_config(synth_shards, tmp_path, "grow", workers=3), traced_ray)  # the same run, 3 workers
    lines = _check_interrupted_epoch(traced_ray, "grow", train_keys, global_batch=3 * 16)
    assert {line["world_size"] for line in lines if line["origin"] > 0} == {3}
    assert final["world_size"] == 3 and final["resumed_from_step"] == max(line["origin"] for line in lines)
