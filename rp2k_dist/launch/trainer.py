"""Run the engine under Ray Train V2: DDP over Ray workers, checkpoints, fault tolerance.

The engine (:func:`rp2k_dist.engine.train.train_worker`) is unchanged; :class:`RayContext`
gives it rank, device, the checkpoint to resume from, and a ``report`` that hands metrics
and rank 0's checkpoint to ``ray.train.report``. The run is named explicitly
(``run.name``) under ``run.storage_path``, so running the same command again after a crash
of the driver resumes from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from .. import run_folder, storage
from ..config import ExperimentConfig, config_from_dict
from ..engine.context import DrainNotice
from ..engine.step_checkpoints import StepObserver
from ..engine.train import train_worker
from ..run_folder import CHECKPOINT, checkpoint_dir_of, load_checkpoint, to_bytes
from ..storage import RunStorage
from .console import EpochPrinter, StepProgress, ray_init_options, worker_log
from .tracking import MlflowRun
from .preflight import check_resources, first_not_retryable, local_resources, preflight
from .ray_private import fail_fast_trainer


class RayContext:
    """The engine's view of one Ray Train worker."""

    def __init__(self, config: ExperimentConfig):
        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.storage = RunStorage(config.run.storage_path, config.run.name)

    def latest_checkpoint(self) -> dict[str, Any] | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return load_checkpoint(Path(folder) / CHECKPOINT)

    def drain_notice(self) -> DrainNotice | None:
        # a barrier: Ray Train broadcasts rank 0's answer, so all ranks act at the same step
        info = ray.train.get_preemption_info()
        if info is None:
            return None
        return DrainNotice(info.deadline_ms, list(info.preempted_node_ids), list(info.preempted_ranks))

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
        if checkpoint is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / CHECKPOINT).write_bytes(to_bytes(checkpoint))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                             checkpoint_dir_name=checkpoint_dir_of(checkpoint))


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 over all parameters: equal on every rank when DDP kept them in sync.
    (BatchNorm running statistics are buffers, updated per rank, and are left out.)"""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    config = config_from_dict(loop_config["config"])
    context = RayContext(config)

    def record_rank(model: torch.nn.Module) -> None:
        context.storage.write_text(f"{run_folder.RANKS}/rank-{context.rank}.json", json.dumps({
            "rank": context.rank, "world_size": context.world_size,
            "node_id": ray.get_runtime_context().get_node_id(), "parameters_sha256": parameter_digest(model)}))

    on_step = StepProgress(context.storage) if loop_config.get("progress") and context.rank == 0 else None
    with worker_log(context.storage, context.rank):
        train_worker(config, context, on_step=on_step, on_finish=record_rank if config.run.rank_digests else None,
                     observers=loop_config.get("observers", ()))


def ray_storage(path: str) -> dict[str, Any]:
    """``RunConfig`` storage arguments: a URI with filesystem parameters
    (``?endpoint_override=...``) becomes its pyarrow filesystem and the path inside it, so
    Ray joins run folders onto the path rather than onto the query."""
    if "?" not in path or not storage.is_uri(path):
        return {"storage_path": storage.absolute(path)}
    fs, inner = storage.resolve(path)
    return {"storage_path": inner, "storage_filesystem": fs}


def build_trainer(config: ExperimentConfig, run_callbacks: list | None = None, progress: bool = False,
                  observers: Sequence[StepObserver] = ()) -> TorchTrainer:
    """The run's TorchTrainer; ``progress``: rank 0 writes the epoch's step count for a
    progress bar; ``observers``: step observers every worker runs (sent pickled)."""
    r = config.run
    backend = r.backend or ("nccl" if r.use_gpu else "gloo")
    return fail_fast_trainer(TorchTrainer, lambda failures: first_not_retryable(failures) is not None)(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "progress": progress, "observers": list(observers)},
        torch_config=TorchConfig(backend=backend),
        # run.workers [min, max]: Ray Train's elastic scaling (start with >= min, resize
        # towards max as nodes come and go); the engine re-plans the epoch for each size
        scaling_config=ScalingConfig(num_workers=(r.min_workers, r.max_workers) if r.elastic else r.workers,
                                     use_gpu=r.use_gpu, resources_per_worker=r.demand(1),
                                     placement_strategy=r.placement_strategy,
                                     elastic_resize_monitor_interval_s=r.elastic_resize_interval_s),
        run_config=RunConfig(
            name=r.name,
            **ray_storage(r.storage_path),
            # preemptions (a drained node) have their own budget: spot capacity is expected to go
            failure_config=FailureConfig(max_failures=r.max_failures, max_preemption_failures=r.max_preemptions),
            checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
            callbacks=run_callbacks,
        ),
    )


def run_training(config: ExperimentConfig, address: str | None = None, verbose: bool = False,
                 console: bool = True, mlflow_uri: str | None = None,
                 observers: Sequence[StepObserver] = ()) -> dict[str, Any]:
    """Fit (or resume) the run on a Ray cluster; returns the final metrics from the run folder.
    ``console``: one summary line per epoch on stdout (a progress bar too on a terminal);
    ``verbose``: Ray's own console output as well; ``mlflow_uri``: also log each epoch to
    MLflow there; ``observers``: see :func:`build_trainer`. ``config`` is not changed."""
    config = config.with_absolute_paths()  # workers may start in another folder than the driver
    # Checked before Ray starts where the cluster's size is known (a bad config costs
    # seconds); a cluster we join is measured once connected.
    if ray.is_initialized():
        preflight(config, ray.cluster_resources())
    else:
        local = ray_address(address) == "local"
        preflight(config, local_resources() if local else None)
        ray.init(address=ray_address(address), **ray_init_options(verbose))
        if not local:
            check_resources(config, ray.cluster_resources())
        if console:  # Ray's own start-up lines are quiet: say which cluster the run is on
            print(cluster_line(local), flush=True)
    folder = RunStorage(config.run.storage_path, config.run.name)
    tracking = MlflowRun(mlflow_uri, config, folder.uri) if mlflow_uri else None
    bar = console and sys.stderr.isatty()
    printer = EpochPrinter(folder, config.optim.epochs, bar=bar, quiet=not console,
                           on_epoch=[tracking.log] if tracking else [])
    with printer, tracking or contextlib.nullcontext():
        return fit(build_trainer(config, progress=bar, observers=observers), config)


def fit(trainer: TorchTrainer, config: ExperimentConfig) -> dict[str, Any]:
    """Run ``trainer`` (of ``config``'s run) to its end; returns the final metrics. A worker
    error that a restart would repeat is raised as itself (one line for the user)."""
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as err:
        cause = first_not_retryable(err.worker_failures)
        if cause is None:
            raise
        raise cause from err
    if result.error is not None:
        raise result.error
    history = read_metrics(config)
    return history[-1] if history else dict(result.metrics or {})


def cluster_line(local: bool) -> str:
    """One line naming the Ray cluster this driver is connected to and its size."""
    resources = ray.cluster_resources()
    where = "started a local Ray" if local else f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}"
    return f"{where} ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs)"


def ray_address(address: str | None) -> str | None:
    """``--address`` as given; without one, the cluster of the Ray job we run in (Ray sets
    RAY_ADDRESS for jobs), else a new local Ray (never a stray cluster on this machine).
    ``--address auto`` joins a cluster started with ``ray start`` on this machine."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return None
    # The local Ray's CPU workers share this machine's cores; OpenMP threads that spin while
    # they wait make such steps up to 30x slower (docs/performance.md), so the workers this
    # Ray starts (they inherit the driver's environment) wait passively unless told otherwise.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return "local"


def read_metrics(config: ExperimentConfig) -> list[dict[str, Any]]:
    """The metrics history of the run ``config`` names."""
    return run_folder.read_metrics(RunStorage(config.run.storage_path, config.run.name))
