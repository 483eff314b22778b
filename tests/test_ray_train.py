"""Ray Train on the shared local Ray cluster: 2-worker DDP, resume by name, a killed worker."""

from __future__ import annotations

import json
import os
import signal

import psutil
import pytest
import ray
import torch

from rp2k_dist.config import load_config
from rp2k_dist.launch.trainer import read_metrics, run_training
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides

pytestmark = pytest.mark.slow


def _config(shards, tmp_path, name, epochs, extra=()):
    return load_config(None, tiny_run_overrides(shards.root, tmp_path, name, epochs)
                       + ["run.workers=2", "run.max_failures=2", "run.rank_digests=true"] + list(extra))


def _ranks(config):
    storage = RunStorage(config.run.storage_path, config.run.name)
    return [json.loads(storage.read_bytes(f"ranks/{n}")) for n in storage.listdir("ranks")]


def test_two_worker_ddp_keeps_ranks_identical_and_reports_what_it_writes(ray_cluster, synth_shards, tmp_path):
    """2 Ray Train workers (DDP over gloo, CPU tensors) with model.bn=sync: all 36 BatchNorm
    layers of the ResNet-34 synchronise (GlooSyncBatchNorm: DDP refuses PyTorch's
    SyncBatchNorm in a CPU model), the ranks stay identical, the checkpoint loads into the
    plain model and predicts what the run reported; one more epoch resumes the run."""
    config = _config(synth_shards, tmp_path, "ddp", epochs=1, extra=["model.bn=sync"])
    final = run_training(config)
    ranks = _ranks(config)
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["parameters_sha256"] == ranks[1]["parameters_sha256"]
    history = read_metrics(config)
    assert [m["epoch"] for m in history] == [1]
    assert final == history[-1]
    assert final["world_size"] == 2 and final["sync_batchnorm_layers"] == 36
    assert final["val_samples"] == synth_shards.num_samples("test")  # each test image once
    assert final["global_batch"] == 2 * 16
    # the distributed evaluation equals the checkpoint's predictions in one process
    import pyarrow.parquet as pq

    from rp2k_dist.evaluation.inference import load_trained, predict_shards

    storage = RunStorage(config.run.storage_path, config.run.name)
    reported = pq.read_table(storage.local_path("predictions.parquet")).to_pydict()
    trained = load_trained(storage.local_path(), "cpu")
    assert type(trained.model.net.bn1) is torch.nn.BatchNorm2d
    again = predict_shards(trained, synth_shards.root, workers=0)
    assert reported["key"] == again.keys
    assert [row[0] for row in reported["top5_classes"]] == again.topk[:, 0].tolist()
    assert 100 * float((again.topk[:, 0] == again.labels).mean()) == pytest.approx(final["val_top1"])
    # the same run with one more epoch: it resumes from its last checkpoint rather than restarting
    again = _config(synth_shards, tmp_path, "ddp", epochs=2, extra=["model.bn=sync"])
    run_training(again)
    longer = read_metrics(again)
    assert [m["epoch"] for m in longer] == [1, 2]
    assert longer[:1] == history
    assert longer[1]["resumed_from_epoch"] == 1


def _descends_from_this_process(process: psutil.Process) -> bool:
    try:
        return any(parent.pid == os.getpid() for parent in process.parents())
    except psutil.Error:
        return False


def _kill_a_train_worker(killed: list[int], started_after: float) -> None:
    """SIGKILL one training worker of the current run: one of this process's local cluster
    (its raylet is a child of this process) started after ``started_after`` (a worker of an
    earlier run may still be exiting)."""
    for process in psutil.process_iter(["cmdline", "create_time", "status"]):
        if (any("RayTrainWorker" in part for part in process.info["cmdline"] or [])
                and process.info["create_time"] >= started_after
                and process.info["status"] != psutil.STATUS_ZOMBIE
                and _descends_from_this_process(process)):
            os.kill(process.pid, signal.SIGKILL)  # a real kill, no exception
            killed.append(process.pid)
            return


class _CountFailures(ray.train.UserCallback):
    """Counts worker-group failures in a file (the callback runs in Ray Train's controller)."""

    def __init__(self, path):
        self.path = str(path)

    def after_exception(self, run_context, worker_exceptions):
        with open(self.path, "a") as handle:
            handle.write(f"{sorted(type(e).__name__ for e in worker_exceptions.values())}\n")


def test_config_error_in_a_worker_is_not_retried(ray_cluster, synth_shards, tmp_path):
    from rp2k_dist.data.manifest import MetaCategoryError
    from rp2k_dist.launch.preflight import first_not_retryable
    from rp2k_dist.launch.trainer import build_trainer

    # past the driver's pre-flight (built directly): the workers meet the bad value
    config = _config(synth_shards, tmp_path, "bad", epochs=1, extra=["data.meta_category=type=nothing", "run.max_failures=3"])
    config.run.storage_path = str(tmp_path)
    failures = tmp_path / "failures.txt"
    with pytest.raises(ray.train.WorkerGroupError) as raised:
        build_trainer(config, run_callbacks=[_CountFailures(failures)]).fit()
    assert isinstance(first_not_retryable(raised.value.worker_failures), MetaCategoryError)
    attempts = failures.read_text().splitlines()
    assert len(attempts) == 1  # one attempt; in it every worker that failed before the group stopped did so on the config
    assert attempts[0] in ("['MetaCategoryError']", "['MetaCategoryError', 'MetaCategoryError']")
