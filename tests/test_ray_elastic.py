"""Spot capacity on a real multi-node Ray cluster: an elastic run whose node is drained.

Two worker nodes (2 CPUs each, one training worker per node) run ``run.workers: [1, 2]``
with a fixed global batch. Mid-epoch one node gets a drain with a preemption deadline
(``ray drain-node``, what the autoscaler sends when a spot instance is reclaimed); the
run checkpoints before the deadline, the node goes, training continues from that mid-epoch
step on 1 worker (no DDP: 3 accumulated micro-batches make the same global batch), scales
back to 2 once a node joins, and finishes. The ranks log the keys of every step (a
:class:`~tests.key_trace.KeyTrace` step observer); a step trained again after a restart
replaces the lost one (:func:`~tests.key_trace.trained_steps`).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from rp2k_dist.config import load_config
from rp2k_dist.launch.ray_private import PREEMPTION_POLL_ENV
from rp2k_dist.launch.trainer import read_metrics, run_training
from rp2k_dist.run_folder import read_preemptions
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides
from tests.key_trace import KeyTrace, read_trace, trained_steps

pytestmark = pytest.mark.slow

GLOBAL_BATCH = 48  # 24 per worker (2 micro-batches of 12) on 2, 3 micro-batches of 16 on 1
DEADLINE_S = 90
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered


@pytest.fixture
def spot_cluster(own_ray, tmp_path):
    trace = tmp_path / "trace"
    with pytest.MonkeyPatch.context() as patch:  # inherited by every raylet, so by Ray Train's actors
        patch.setenv(PREEMPTION_POLL_ENV, "0.5")
        # A node is declared dead 3 failed checks 1 s apart after it goes (Ray's default:
        # 5 checks 3 s apart). Until then Ray Train may restart at the old size and wait
        # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (default 60 s) for a worker that cannot be placed.
        patch.setenv("RAY_health_check_period_ms", "1000")
        patch.setenv("RAY_health_check_failure_threshold", "3")
        patch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        joined: list[subprocess.Popen] = []  # nodes started later, as their own `ray start` processes
        yield cluster, nodes, trace, joined
        ray.shutdown()
        for process in joined:
            process.terminate()  # `ray start --block` stops its node on SIGTERM
            process.wait(timeout=60)
        cluster.shutdown()


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _drain(address: str, node_id: str, seconds: int) -> None:
    """The command a person (or the autoscaler, through the same GCS call) uses."""
    subprocess.run([_ray_cli(), "drain-node", "--address", address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot instance reclaimed",
                    "--deadline-remaining-seconds", str(seconds)], check=True, capture_output=True, timeout=60)


def _preempt_then_add_a_node(cluster, nodes, joined, config, trace: Path, log: dict) -> threading.Thread:
    """Drain a node once training runs; remove it once the run's drain checkpoint is
    registered (as the provider reclaims it by the deadline); start a fresh node (a
    ``ray start`` process: ``Cluster.add_node`` only works on the main thread) once
    training continues on 2 workers."""
    storage = RunStorage(config.run.storage_path, config.run.name)
    folder = trace / config.run.name
    hold = trace / f"{config.run.name}.hold"

    def lines() -> list[dict]:
        return read_trace(folder) if folder.exists() else []

    def wait(condition, what: str, limit: float = 240) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            if time.monotonic() > deadline:
                log["error"] = f"timed out waiting for {what}"
                raise TimeoutError(log["error"])
            time.sleep(0.1)

    def act():
        wait(lambda: any(line["step"] >= 1 for line in lines()), "the first step")
        drained = nodes[1]
        _drain(cluster.address, drained.node_id, DEADLINE_S)
        log["drained"], log["drained_at"] = drained.node_id, time.time()
        wait(lambda: read_preemptions(storage), "the drain checkpoint")
        saved = read_preemptions(storage)[0]["checkpoint"]
        wait(lambda: storage.exists(SNAPSHOT) and saved in storage.read_bytes(SNAPSHOT).decode(),
             "Ray Train to register the drain checkpoint")
        cluster.remove_node(drained)  # the provider reclaims the instance
        log["removed_at"] = time.time()
        wait(lambda: any(line["world_size"] == 1 for line in lines()), "training on 1 worker")
        hold.write_text("2")  # the 1 worker waits after each step until the run has grown back
        try:
            joined.append(subprocess.Popen([_ray_cli(), "start", "--address", cluster.address, "--num-cpus", "2",
                                            "--block"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            log["added"] = True
            wait(lambda: any(line["world_size"] == 2 and line["origin"] > 0 for line in lines()), "training on 2 again")
        finally:
            hold.unlink(missing_ok=True)

    thread = threading.Thread(target=lambda: log.setdefault("result", act()), daemon=True)
    thread.start()
    return thread


def test_elastic_run_checkpoints_on_a_drain_continues_on_fewer_workers_and_grows_back(spot_cluster, synth_shards, tmp_path,
                                                                                      capsys):
    cluster, nodes, trace, joined = spot_cluster
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path / "runs", "spot", epochs=2) + [
        "run.workers=[1, 2]", f"optim.global_batch={GLOBAL_BATCH}", "run.cpus_per_worker=2",
        "run.preemption_check_steps=1", "run.elastic_resize_interval_s=2", "run.max_failures=3"])
    log: dict = {}
    watcher = _preempt_then_add_a_node(cluster, nodes, joined, config, trace, log)
    final = run_training(config, observers=[KeyTrace(trace / config.run.name, pace=0.4,
                                                     hold=trace / f"{config.run.name}.hold")])
    watcher.join(timeout=5)
    assert "error" not in log and log.get("added"), log

    # the drain: one event, the deadline, a mid-epoch checkpoint saved before it
    (event,) = read_preemptions(RunStorage(config.run.storage_path, config.run.name))
    assert event["node_ids"] == [log["drained"]] and len(event["ranks"]) == 1
    assert event["world_size"] == 2 and event["saved"] == "mid-epoch checkpoint"
    assert 0 < event["seconds_left"] <= DEADLINE_S and event["saved_before_deadline"] is True
    assert event["checkpoint"] == f"epoch_{event['epoch'] - 1:04d}_step_{event['global_step']:07d}"
    steps_per_epoch = synth_shards.num_samples("train") // GLOBAL_BATCH
    assert event["consumed"] == (event["global_step"] - (event["epoch"] - 1) * steps_per_epoch) * GLOBAL_BATCH
    assert f"saved {event['checkpoint']} ({event['consumed']} samples of epoch 1) before it" in capsys.readouterr().out

    lines = read_trace(trace / config.run.name)
    attempts = sorted({(line["origin"], line["attempt"], line["world_size"]) for line in lines})
    worlds = [w for _, _, w in attempts]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, attempts  # 2 -> 1 -> 2 workers
    on_one = [a for a in attempts if a[2] == 1]
    assert on_one[0][0] == event["global_step"]  # continued on 1 from the drain's mid-epoch step

    # every planned step trained exactly once in the end, no epoch skipped, no sample twice
    kept = trained_steps(lines)
    assert sorted(kept) == list(range(1, 2 * steps_per_epoch + 1))
    for epoch in (0, 1):
        keys = [k for step in sorted(kept) for line in kept[step] if line["epoch"] == epoch for k in line["keys"]]
        assert len(keys) == len(set(keys)) == steps_per_epoch * GLOBAL_BATCH, epoch
    history = read_metrics(config)
    assert [m["epoch"] for m in history] == [1, 2]
    assert {m["global_batch"] for m in history} == {GLOBAL_BATCH}
    assert final["world_size"] == 2 and final["epoch"] == 2
