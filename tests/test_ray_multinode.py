"""A real multi-node Ray cluster on one machine: one worker per node, a node lost mid-run."""

from __future__ import annotations

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from rp2k_dist.config import load_config
from rp2k_dist.launch.trainer import read_metrics, run_training
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides
from tests.helpers import after_epoch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(own_ray):
    """A head of 1 CPU (no training worker fits there), for the module's tests."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def three_node_cluster(cluster):
    """Three worker nodes of 2 CPUs: two for the two workers and a spare one to move to (as
    an autoscaler provides). Nodes an earlier test removed are replaced."""
    while len(cluster.worker_nodes) < 3:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return cluster, list(cluster.worker_nodes)


def _config(shards, tmp_path, name, epochs, max_failures):
    return load_config(None, tiny_run_overrides(shards.root, tmp_path, name, epochs) + [
        "run.workers=2", "run.cpus_per_worker=2", "run.placement_strategy=STRICT_SPREAD",
        f"run.max_failures={max_failures}", "run.rank_digests=true"])


def _busy_node(nodes) -> object:
    """A worker node that hosts a training worker right now."""
    import psutil

    pids = {p.pid for p in psutil.process_iter(["cmdline"])
            if any("RayTrainWorker" in part for part in p.info["cmdline"] or [])}
    for node in nodes:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        if {c.pid for c in raylet.children(recursive=True)} & pids:
            return node
    raise AssertionError("no node hosts a training worker")


def test_one_worker_per_node_survives_losing_a_node(three_node_cluster, synth_shards, tmp_path):
    cluster, nodes = three_node_cluster
    config = _config(synth_shards, tmp_path, "nodes", epochs=3, max_failures=2)
    removed = []
    watcher = after_epoch(config, 2, lambda: (removed.append(_busy_node(nodes)), cluster.remove_node(removed[0])))
    final = run_training(config)
    watcher.join(timeout=5)
    history = read_metrics(config)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert any("resumed_from_epoch" in m for m in history)
    assert final["epoch"] == 3
    storage = RunStorage(config.run.storage_path, config.run.name)
    ranks = [json.loads(storage.read_bytes(f"ranks/{n}")) for n in storage.listdir("ranks")]
    assert len({r["node_id"] for r in ranks}) == 2  # one worker per node, after the restart too
    assert removed and removed[0].node_id not in {r["node_id"] for r in ranks}


def test_losing_a_node_without_failure_budget_is_a_clear_error(three_node_cluster, synth_shards, tmp_path):
    cluster, nodes = three_node_cluster
    config = _config(synth_shards, tmp_path, "nobudget", epochs=4, max_failures=0)
    watcher = after_epoch(config, 1, lambda: cluster.remove_node(_busy_node(nodes)))
    with pytest.raises(Exception, match="(?i)worker|node|died|actor"):
        run_training(config)
    watcher.join(timeout=5)
    assert max(m["epoch"] for m in read_metrics(config)) < 4
