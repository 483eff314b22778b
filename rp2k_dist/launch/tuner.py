"""Hyperparameter sweeps with Ray Tune: one Ray Train (V2) run per trial.

``rp2k tune PRESET`` samples config values (``loss.cbl_beta``, ``optim.lr``, ``augment.border``,
...) from a search space, trains one model per sample, early-stops weak trials with ASHA and
leaves, in the sweep folder ``<run.storage_path>/<run.name>/``:

- ``trials.parquet`` / ``trials.csv``: one row per trial (status, sampled values, epochs run,
  best epoch, best val top-1 and the top-5 of that epoch), also printed as a table;
- ``best.yaml``: the best trial's full config, a preset that ``rp2k train`` accepts as is;
- ``base.yaml``: the resolved base config of the sweep (a resumed sweep must use the same);
- ``trials/<trial id>/``: each trial's Train run (config.yaml, metrics.jsonl, checkpoints,
  predictions, table2.md) and ``trial.json`` (how it ended, written by the sweep driver);
- Tune's own files: experiment state (for resuming) and per-trial ``progress.csv``,
  ``result.json`` and TensorBoard events (Tune's default logger callbacks).

How Train V2 and Tune are combined (Ray's guide "Hyperparameter Tuning with Ray Tune" and
``ray/tune/integration/ray_train.py``): the Tune trainable is a *driver function*
(:func:`rp2k_trial`) that builds the trial's config and calls
``build_trainer(config, [TuneReportCallback()]).fit()``. The TorchTrainer starts its own
controller and ``run.workers`` DDP workers in its own placement group; ``TuneReportCallback``
(a Train ``UserCallback`` on the controller) hands rank 0's metrics of every
``ray.train.report`` to Tune. ``Tuner(trainer)`` is deprecated in V2.

Choices (each made where it is used):

- **Driver resources**: the driver reserves no CPU or GPU, only 0.01 of the head node's
  ``node:__internal_head__`` resource. Tune cannot request nothing at all (an empty bundle is
  refused), a fraction of a CPU would leave a GPU node one CPU short of a trial that fills it,
  and Ray advises running Train drivers on a node that is not preempted (the clusters of
  ``cluster/`` start their head with ``--num-cpus 0``). Each driver is a Python process on
  the head (the Train controller follows it there); concurrency is capped instead by
  ``max_concurrent_trials`` = cluster GPUs (or CPUs) // what one trial's workers take.
- **Trial names**: a trial's Train run is ``trials/<Tune trial id>``: stable across a resume,
  so a restarted trial resumes its Train run from the last checkpoint (Ray: no timestamps or
  random values in the name).
- **Failures**: a trial whose Train run fails (NaN loss, a worker dying more often than
  ``run.max_failures``) ends as ERROR and the sweep goes on; Tune does not retry it
  (``FailureConfig(max_failures=0)``): worker failures are already retried by Train.
- **Resume**: the same command again continues a sweep whose driver died
  (``Tuner.restore(resume_unfinished=True, resume_errored=False, restart_errored=False)``):
  finished trials are kept, unfinished ones resume their Train run, failed ones stay failed
  (a NaN loss fails again; start a new sweep name to retry them). Tune saves its state only
  every ~10 s, so the sweep driver also writes ``trial.json`` the moment a trial ends, and a
  trial that finds its ``trial.json`` replays its result instead of training again.
- **Stopped trials free their resources**: when ASHA stops a trial, Tune ends the driver
  actor; its Train controller and workers die with it, but the workers' placement group
  belongs to the sweep's job and stays reserved until the sweep ends (ray issue 54305).
  Ray 2.60's fix, a detached ``PlacementGroupCleaner`` per Train run, asks the State API
  whether the controller is alive, at an address it finds from the environment
  (``RAY_ADDRESS``, else the last ``ray start`` cluster of the machine). Without a dashboard
  it never answers (the group leaks and the cleaner process stays forever); with several
  Ray clusters on one machine it may ask another cluster, read "not found" as dead and
  remove the placement group of a *running* trial (which then fails with "Destroying worker
  since its placement group was removed"). So sweep trials run without
  that cleaner, and the sweep driver itself removes every placement group of its job whose
  creating actor (a Train controller) is dead (:func:`free_orphaned_placement_groups`),
  asking its own cluster's GCS: the groups the cleaner is meant to remove, and only those.
- **ASHA** uses ``time_attr="epoch"`` (the engine's epoch counter, correct across resumes, where
  Tune's ``training_iteration`` restarts), ``metric="val_top1"``, ``max_t=optim.epochs``;
  every trial evaluates each epoch (``run.eval_every=1``); a trial that reaches ``max_t``
  finishes on its own instead of being stopped (``stop_last_trials=False``).
- **Best trial**: the highest val top-1 at any epoch among trials that did not fail.
- **Search space**: parsed, resolved, probed and checked in :mod:`rp2k_dist.launch.search_space`.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ..config import (
    ConfigError,
    ExperimentConfig,
    SweepConfig,
    config_from_dict,
    load_config,
    read_yaml,
    resolve_preset,
    sweep_config,
)
from ..errors import Rp2kError
from .. import storage
from ..run_folder import BEST, SWEEP_BASE, TRIAL_RECORD, TRIALS, TRIALS_CSV, TRIALS_PARQUET
from ..storage import RunStorage
from .ray_private import drop_placement_group_cleaner, orphaned_placement_groups
from .trainer import build_trainer, ray_address, ray_storage, read_metrics

from .search_space import (
    apply_values, check_search_space, is_grid, load_search_space, parse_search_space,
    resolve_search_space,
)


#: What a trial's driver function reserves (see "Driver resources" above).
DRIVER_RESOURCES: dict[str, float] = {"node:__internal_head__": 0.01}

METRIC = "val_top1"
DEFAULT_RANDOM_SAMPLES = 16


# --------------------------------------------------------------------------- sweep presets


@dataclass
class Sweep:
    """A sweep preset resolved: base config, Tune param space, settings."""

    config: ExperimentConfig
    space: dict[str, Any]
    settings: SweepConfig


def load_sweep(path: str | Path, overrides: list[str] | None = None, search_space: str | Path | None = None) -> Sweep:
    """A training preset or a sweep preset, with its search space.

    A sweep preset is a training preset (sections, ``base: other.yaml``) plus ``search_space:``
    (a mapping as in ``jobs/search_space.yaml``) and optionally ``tune:`` (:class:`SweepConfig`).
    The space is ``search_space`` (a file) if given, else the preset's ``search_space:``, else
    ``search_space.yaml`` next to the preset (``jobs/search_space.yaml`` for the presets in jobs/);
    ``optim.lr: {loguniform: auto}`` becomes the range of the config's optimizer.
    """
    path = resolve_preset(path)
    data = read_yaml(path)
    inline = data.pop("search_space", None)
    tune_section = data.pop("tune", None)
    config = load_config(None, overrides, base=data)
    try:
        settings = sweep_config(tune_section)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if search_space is not None:
        space = load_search_space(search_space)
    elif inline is not None:
        space = parse_search_space(inline, f"{path}: search_space")
    elif (path.parent / "search_space.yaml").is_file():
        space = load_search_space(path.parent / "search_space.yaml")
    else:
        raise ConfigError(f"{path} has no search_space: and no search_space.yaml lies next to it; "
                          "pass --search-space FILE (e.g. jobs/search_space.yaml)")
    return Sweep(config, resolve_search_space(config, space), settings)


# --------------------------------------------------------------------------- one trial


def trial_config(base: dict[str, Any], params: dict[str, Any], trials_uri: str, trial_id: str) -> ExperimentConfig:
    """The config of one trial: base + sampled values, its own run under ``trials_uri``."""
    data = apply_values(base, params)
    data["run"].update(name=trial_id, storage_path=trials_uri, eval_every=1)
    return config_from_dict(data)


class TrialFailedBefore(Rp2kError):
    """A trial that had failed before the sweep was resumed (its error is replayed, not retried)."""


def rp2k_trial(params: dict[str, Any], base: dict[str, Any], trials_uri: str) -> None:
    """The Tune trainable: the driver of one trial's Ray Train run (with TuneReportCallback)."""
    trial_id = tune.get_context().get_trial_id()
    config = trial_config(base, params, trials_uri, trial_id)
    record = read_trial_record(trials_uri, trial_id)
    if record is not None:  # it ended before the sweep driver died: replay, do not train again
        if record["status"] == "ERROR":
            raise TrialFailedBefore(record["error"])
        history = read_metrics(config)
        if history:
            tune.report(history[-1])
        return
    trainer = build_trainer(config, run_callbacks=[TuneReportCallback()])
    drop_placement_group_cleaner(trainer)
    trainer.fit()


def read_trial_record(trials_uri: str, trial_id: str) -> dict[str, Any] | None:
    """The ``trial.json`` of an ended trial (None while it has not ended)."""
    storage = RunStorage(trials_uri, trial_id)
    return json.loads(storage.read_bytes(TRIAL_RECORD)) if storage.exists(TRIAL_RECORD) else None


def _error_text(trial: Any) -> str:
    """The most telling line of a trial's error (the worker's exception, not Ray's wrappers)."""
    path = Path(trial.error_file) if trial.error_file else None
    text = path.read_text(encoding="utf-8", errors="replace") if path and path.exists() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Failure #")]
    named = [line for line in lines if "Error:" in line and not line.startswith(("ray.", "Traceback"))]
    return (named[-1] if named else lines[-1] if lines else "unknown error")[:500]


# --------------------------------------------------------------------------- leaked placement groups


def free_orphaned_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor (a Train controller) is dead.

    Such a group is what a stopped trial leaves behind (ray issue 54305): its workers are gone,
    nothing can use it, and Ray would keep it until the sweep's job ends. Returns how many."""
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    orphans, _ = orphaned_placement_groups()
    for group_id in orphans:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(group_id)))
    return len(orphans)


def wait_for_trial_placement_groups(timeout_s: float = 60.0) -> bool:
    """After the sweep: free leaked groups until no trial's group is left (True) or timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        free_orphaned_placement_groups()
        if orphaned_placement_groups()[1] == 0:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


class SweepBookkeeping(tune.Callback):
    """Runs in the sweep driver: records each ended trial at once (``trial.json``) and frees
    the placement groups that stopped trials leave behind."""

    def __init__(self, trials_uri: str, reap_every_s: float = 1.0):
        self.trials_uri = trials_uri
        self.reap_every_s = reap_every_s
        self._last_reap = 0.0

    def _record(self, trial: Any, error: str | None) -> None:
        record = {"trial_id": trial.trial_id, "status": "ERROR" if error else "TERMINATED",
                  "params": trial.config, "error": error}
        RunStorage(self.trials_uri, trial.trial_id).write_text(TRIAL_RECORD, json.dumps(record, default=str))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._record(trial, _error_text(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last_reap >= self.reap_every_s:
            self._last_reap = time.monotonic()
            free_orphaned_placement_groups()


# --------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """What a sweep leaves: its folder, the table of trials, the best config (None if every
    trial failed) and where ``best.yaml`` is."""

    path: str
    table: pd.DataFrame
    best_config: ExperimentConfig | None
    best_yaml: str | None


def trial_table(config: ExperimentConfig, space_keys: list[str]) -> pd.DataFrame:
    """One row per ended trial of the sweep ``config.run.name``, best first: trial_id, status
    (TERMINATED, STOPPED = stopped early by ASHA, ERROR), the sampled values, epochs run, best
    epoch, best val top-1 and the val top-5 of that epoch, the trial's run folder, its error."""
    sweep = RunStorage(config.run.storage_path, config.run.name)
    trials_uri = sweep.location(TRIALS)
    rows = []
    for trial_id in sweep.listdir(TRIALS):
        record = read_trial_record(trials_uri, trial_id)
        if record is None:
            continue
        trial = trial_config(config.to_dict(), record["params"], trials_uri, trial_id)
        history = read_metrics(trial)
        evaluated = [m for m in history if METRIC in m]
        best = max(evaluated, key=lambda m: m[METRIC]) if evaluated else {}
        ran = max((m["epoch"] for m in history), default=0)
        status = record["status"]
        if status == "TERMINATED" and ran < trial.optim.epochs:
            status = "STOPPED"
        rows.append({"trial_id": trial_id, "status": status,
                     **{key: record["params"].get(key) for key in space_keys},
                     "epochs": ran, "best_epoch": best.get("epoch"), "best_val_top1": best.get(METRIC, math.nan),
                     "val_top5": best.get("val_top5", math.nan), "run": storage.join(trials_uri, trial_id),
                     "error": record["error"] or ""})
    table = pd.DataFrame(rows, columns=["trial_id", "status", *space_keys, "epochs", "best_epoch",
                                        "best_val_top1", "val_top5", "run", "error"])
    table["best_epoch"] = table["best_epoch"].astype("Int64")
    for key in space_keys:  # a column mixing strings and numbers (choice: [random, 128]) as text
        if table[key].dtype == object and len({type(v) for v in table[key].dropna()}) > 1:
            table[key] = table[key].astype(str)
    return table.sort_values(["best_val_top1", "trial_id"], ascending=[False, True], na_position="last",
                             ignore_index=True)


def format_table(table: pd.DataFrame) -> str:
    """The trials as a fixed-width text table (without the run folders)."""
    shown = table.drop(columns=["run"]).copy()
    shown["error"] = shown["error"].str.slice(0, 60)
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def best_config(base: ExperimentConfig, table: pd.DataFrame, space_keys: list[str],
                name: str) -> ExperimentConfig | None:
    """The base config with the best trial's values, as run ``name`` under the base storage."""
    ok = table[(table["status"] != "ERROR") & table["best_val_top1"].notna()]
    if ok.empty:
        return None
    row = ok.iloc[0]
    values = {key: (row[key].item() if hasattr(row[key], "item") else row[key]) for key in space_keys}
    data = apply_values(base.to_dict(), values)
    data["run"]["name"] = name
    return config_from_dict(data)


# --------------------------------------------------------------------------- the sweep


def default_max_concurrent(config: ExperimentConfig) -> int:
    """How many trials fit at once: the cluster's GPUs (or CPUs) // one trial's workers' share."""
    unit = config.run.unit
    return max(1, int(ray.cluster_resources().get(unit, 0.0) // config.run.demand()[unit]))


def _mlflow_callback(uri: str, experiment: str) -> tune.Callback:
    if find_spec("mlflow") is None:
        raise ConfigError(f"--mlflow-uri {uri} needs the mlflow package, which is not installed (pip install mlflow)")
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment, save_artifact=False)


def _claim_sweep_folder(sweep: RunStorage, config: ExperimentConfig) -> None:
    """Write ``base.yaml``, or check that a resumed sweep has the same base config."""
    text = config.to_yaml()
    if sweep.exists(SWEEP_BASE) and sweep.read_text(SWEEP_BASE) != text:
        raise ConfigError(f"sweep {sweep.uri} was started with another base config (see its base.yaml); "
                          "run the same command to resume it, or pick a new name (--name) for a new sweep")
    sweep.write_text(SWEEP_BASE, text)


def run_sweep(
    config: ExperimentConfig,
    space: dict[str, Any],
    settings: SweepConfig,
    *,
    address: str | None = None,
    mlflow_uri: str | None = None,
) -> SweepResult:
    """Run (or resume) the sweep ``run.name`` under ``run.storage_path``; see the module doc.

    ``space``: Tune param space keyed by dotted config keys (:func:`load_search_space`;
    ``optim.lr: {loguniform: auto}`` resolved for ``config``'s optimizer);
    ``settings``: samples per grid point (None: 1 for a pure grid, else
    :data:`DEFAULT_RANDOM_SAMPLES`), scheduler, concurrency (None:
    :func:`default_max_concurrent`) and ASHA's rungs; ``mlflow_uri``: also log every trial to
    MLflow. A resumed sweep keeps the space and settings it started with.
    """
    space = resolve_search_space(config, space)
    samples = settings.samples or (1 if is_grid(space) else DEFAULT_RANDOM_SAMPLES)
    config = config.with_absolute_paths()  # trials run in other folders, maybe on other nodes
    check_search_space(config, space)
    callbacks: list[tune.Callback] = [_mlflow_callback(mlflow_uri, config.run.name)] if mlflow_uri else []
    if not ray.is_initialized():
        ray.init(address=ray_address(address), log_to_driver=True)

    sweep = RunStorage(config.run.storage_path, config.run.name)
    _claim_sweep_folder(sweep, config)
    trials_uri = sweep.location(TRIALS)
    trainable = tune.with_resources(
        tune.with_parameters(rp2k_trial, base=config.to_dict(), trials_uri=trials_uri), DRIVER_RESOURCES)
    if tune.Tuner.can_restore(sweep.uri):
        print(f"resuming sweep {sweep.uri}: finished and failed trials are kept, unfinished ones resume")
        tuner = tune.Tuner.restore(sweep.uri, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        # stop_last_trials=False: a trial that reaches max_t ends on its own (Train shuts down
        # cleanly, the last epoch's artefacts are complete) instead of being stopped by Tune.
        asha = tune.schedulers.ASHAScheduler(time_attr="epoch", max_t=config.optim.epochs,
                                             grace_period=settings.grace_period,
                                             reduction_factor=settings.reduction_factor, stop_last_trials=False)
        # The concurrency limit goes into the generator: Tune ignores max_concurrent_trials
        # (with a warning) when a BasicVariantGenerator is passed.
        searcher = tune.search.BasicVariantGenerator(
            max_concurrent=settings.max_concurrent or default_max_concurrent(config), random_state=config.run.seed)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", num_samples=samples, search_alg=searcher,
                                        scheduler=asha if settings.scheduler == "asha" else None),
            run_config=tune.RunConfig(
                name=config.run.name, **ray_storage(config.run.storage_path),
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[SweepBookkeeping(trials_uri), *callbacks],
            ),
        )
    tuner.fit()
    if not wait_for_trial_placement_groups():
        print("warning: placement groups of ended trials are still reserved after 60 s")

    keys = list(space)
    table = trial_table(config, keys)
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    sweep.write_bytes(TRIALS_PARQUET, buffer.getvalue())
    sweep.write_text(TRIALS_CSV, table.to_csv(index=False))
    best = best_config(config, table, keys, f"{config.run.name}-best")
    best_yaml = None
    if best is not None:
        sweep.write_text(BEST, best.to_yaml())
        best_yaml = sweep.location(BEST)
    return SweepResult(sweep.uri, table, best, best_yaml)
