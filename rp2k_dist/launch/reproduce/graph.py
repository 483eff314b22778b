"""The paper's experiments as one graph of ordinary training runs, and the scheduler that
runs it on a Ray cluster.

Every node of :data:`PAPER` is an ``rp2k train`` of one preset of ``jobs/``, with its own run
name under one storage path. The graph::

    table2-resnet34 ──┬─> table3-apinet-liquor ────┐
                      ├─> table3-apinet-cosmetics ─┴─> ensemble (Table 3)
                      └─> umap (Fig. 3)
    table2-inception-v3, table4-scratch-aug, table4-transfer, table4-transfer-aug, cbl-off
    all runs ─> report (Tables 2, 3, 4, the CBL ablation, Fig. 3, GPU-hours spent)

Table 4's first row ("from scratch", no augmentation) is Table 2's ResNet-34 (the same
preset), so it is trained once. A specialist starts from the general ResNet-34's final
checkpoint (``model.weights``), so it waits for it; every other run is independent.

How it runs (one driver, e.g. ``rp2k submit`` of the same command): each run is a Ray task
on the head node that reserves nothing itself (as Tune's trial drivers,
:data:`~rp2k_dist.launch.tuner.DRIVER_RESOURCES`) and fits the run's TorchTrainer. The
driver starts a run when its inputs exist and the cluster has room for its workers (its
``run.workers x run.gpus_per_worker`` GPUs, or CPUs without GPUs), counting what the runs it
started hold. Runs and the driver share fate: if the driver dies, Ray ends its runs, and the
same command again skips every finished run (its evaluation of the last epoch exists),
resumes interrupted ones from their last checkpoint and starts the rest. One failed run
stops only the runs that need it. ``reproduce.json`` in the storage path records each run's
state, start and end times, GPUs and error.

After the runs, one Ray task (on a GPU when the cluster has one, never in the driver) writes
the routed ensemble (Table 3) and the UMAP figure (Fig. 3) into the general run's folder,
unless they are newer than every run they read; then ``reproduce.md`` and
``reproduce.html`` go into the storage path. The storage path may be a local or mounted
folder, s3:// or gs://: every step reads and writes through :mod:`rp2k_dist.storage`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ... import run_folder, storage
from ...config import ConfigError, ExperimentConfig, load_config
from ...storage import RunStorage

GENERAL = "table2-resnet34"

#: Parts of the paper (``--only``) and the runs each needs.
PARTS = ("table2", "table3", "table4", "cbl", "fig3")


@dataclass(frozen=True)
class Experiment:
    """One training run of the reproduction."""

    name: str  # run.name under the storage path
    preset: str  # a preset of jobs/ (by name)
    part: str  # the part of the paper it is trained for (``--set PART:key=value`` scope)
    feeds: tuple[str, ...] = ()  # further parts that use it
    needs: str | None = None  # the run whose final checkpoint is this run's model.weights

    @property
    def parts(self) -> tuple[str, ...]:
        return (self.part, *self.feeds)


PAPER: tuple[Experiment, ...] = (
    Experiment(GENERAL, "table2_resnet34", "table2", feeds=("table3", "table4", "cbl", "fig3")),
    Experiment("table2-inception-v3", "table2_inception_v3", "table2"),
    Experiment("table3-apinet-liquor", "table3_apinet_liquor", "table3", needs=GENERAL),
    Experiment("table3-apinet-cosmetics", "table3_apinet_cosmetics", "table3", needs=GENERAL),
    Experiment("table4-scratch-aug", "table4_scratch_aug", "table4"),
    Experiment("table4-transfer", "table4_transfer", "table4"),
    Experiment("table4-transfer-aug", "table4_transfer_aug", "table4"),
    Experiment("cbl-off", "cbl_off", "cbl"),
)
SPECIALISTS = ("table3-apinet-liquor", "table3-apinet-cosmetics")
TABLE4 = (GENERAL, "table4-transfer", "table4-scratch-aug", "table4-transfer-aug")

# --------------------------------------------------------------------------- the graph


def select(only: Iterable[str] | None) -> list[Experiment]:
    """The runs of the chosen parts of the paper or the chosen runs (all by default), with
    the runs they need."""
    wanted = set(only or PARTS)
    names = {e.name for e in PAPER}
    unknown = wanted - set(PARTS) - names
    if unknown:
        raise ConfigError(f"--only: unknown part(s) or run(s) {sorted(unknown)}; choose from the parts "
                          f"{', '.join(PARTS)} or the runs {', '.join(sorted(names))}")
    chosen = {e.name for e in PAPER if e.name in wanted or wanted & set(e.parts)}
    chosen |= {e.needs for e in PAPER if e.name in chosen and e.needs}
    return [e for e in PAPER if e.name in chosen]


def split_sets(sets: Sequence[str], names: Iterable[str]) -> dict[str, list[str]]:
    """``--set`` values per run: ``key=value`` for every run, ``PART:key=value`` or
    ``RUN:key=value`` (``table3:optim.epochs=50``) for the runs trained for one part (Table 2's
    ResNet-34 belongs to table2 only) or for one run."""
    experiments = {e.name: e for e in PAPER if e.name in set(names)}
    per_run: dict[str, list[str]] = {name: [] for name in experiments}
    for item in sets:
        scope, sep, override = item.partition(":")
        if not sep or "=" in scope:
            for name in per_run:
                per_run[name].append(item)
            continue
        targets = [n for n, e in experiments.items() if scope in (n, e.part)]
        if scope not in PARTS and scope not in {e.name for e in PAPER}:
            raise ConfigError(f"--set {item!r}: {scope!r} is neither a part ({', '.join(PARTS)}) nor a run "
                              f"({', '.join(e.name for e in PAPER)})")
        for name in targets:
            per_run[name].append(override)
    return per_run


def build_configs(experiments: Sequence[Experiment], shards: str, storage_path: str,
                  sets: Sequence[str] = ()) -> dict[str, ExperimentConfig]:
    """Each run's config: its preset < ``data.shards`` and ``run.storage_path`` < ``--set``.
    A specialist's ``model.weights`` is filled in when its general model has finished."""
    per_run = split_sets(sets, [e.name for e in experiments])
    configs = {}
    for e in experiments:
        config = load_config(e.preset, [f"data.shards={shards}", f"run.storage_path={storage_path}", f"run.name={e.name}",
                                        *per_run[e.name]])
        if e.needs:
            config.model.weights = ""
        configs[e.name] = config
    return configs


def check_inputs(experiments: Sequence[Experiment], configs: dict[str, ExperimentConfig],
                 resources: dict[str, float] | None) -> None:
    """Every problem of every run found before anything trains (ImageNet weights of the
    transfer runs, meta-categories and their classes, P x K batches, cluster size,
    storage), one line each, prefixed with the run's name."""
    from ..preflight import PreflightError, preflight

    problems = []
    for e in experiments:
        try:
            preflight(configs[e.name], resources)
        except PreflightError as err:
            problems += [f"{e.name} ({e.preset}): {line}" for line in err.problems]
    if problems:
        raise PreflightError(problems)


def is_finished(config: ExperimentConfig) -> bool:
    """The run has evaluated its last planned epoch (``evaluation.json`` of that epoch) and
    saved that epoch's checkpoint. Rank 0 writes the evaluation first: a run stopped between
    the two (its driver killed) is not finished, and resumes from its last checkpoint."""
    folder = RunStorage(config.run.storage_path, config.run.name)
    if not folder.exists(run_folder.EVALUATION):
        return False
    epoch = int(json.loads(folder.read_bytes(run_folder.EVALUATION)).get("final", {}).get("epoch", 0))
    return epoch >= config.optim.epochs and folder.exists(f"{run_folder.checkpoint_dir(epoch)}/{run_folder.CHECKPOINT}")


def folder_times(config: ExperimentConfig) -> tuple[float | None, float | None]:
    """(start, end) unix times of a run from its folder: when rank 0 wrote ``config.yaml``
    (at the start of its last attempt) and its final ``evaluation.json``."""
    folder = RunStorage(config.run.storage_path, config.run.name)
    return folder.mtime(run_folder.CONFIG), folder.mtime(run_folder.EVALUATION)


# --------------------------------------------------------------------------- the run


@dataclass
class RunRecord:
    """What ``reproduce.json`` says about one run."""

    name: str
    state: str = "waiting"  # waiting | running | finished | failed | skipped
    amount: float = 0.0  # GPUs (or CPUs, ``unit``) its workers hold
    unit: str = "GPU"
    started: float | None = None  # unix time
    finished: float | None = None
    error: str | None = None
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Reproduction:
    """The state of one ``rp2k reproduce`` (written to ``reproduce.json`` at every change)."""

    storage_path: str
    records: dict[str, RunRecord] = field(default_factory=dict)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # evaluate: the ensemble and UMAP task
    driver: dict[str, Any] = field(default_factory=dict)  # the Ray node this command runs on

    def save(self) -> None:
        storage.write_text(storage.join(self.storage_path, run_folder.REPRODUCE_STATE), json.dumps(
            {"runs": [r.to_dict() for r in self.records.values()], "steps": self.steps, "driver": self.driver},
            indent=1))

    @staticmethod
    def previous(storage_path: str) -> dict[str, Any]:
        location = storage.join(storage_path, run_folder.REPRODUCE_STATE)
        return json.loads(storage.read_bytes(location)) if storage.exists(location) else {}


def error_line(err: BaseException) -> str:
    """One line for the summary: the exception a run's task raised (not Ray's wrapper) and,
    of a failed worker group, the workers' last error line."""
    cause = getattr(err, "cause", None) or err  # a RayTaskError carries the task's own exception
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(cause).splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b[^:]*:", line)]
    return f"{type(cause).__name__}: {(errors[-1] if errors else lines[0] if lines else '')[:300]}"


def _train_task(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Inside a Ray task: fit one run (resuming it when its folder has a checkpoint)."""
    from ...config import config_from_dict
    from ..ray_private import drop_placement_group_cleaner
    from ..trainer import build_trainer, fit

    started = time.time()
    config = config_from_dict(config_dict)
    trainer = build_trainer(config)
    # The run's placement group is freed when it ends, or with this job if the driver dies;
    # Ray's cleaner would ask whichever cluster the environment names (see tuner.py).
    drop_placement_group_cleaner(trainer)
    final = fit(trainer, config)
    return {"started": started, "finished": time.time(), "final": final}


def run_graph(experiments: Sequence[Experiment], configs: dict[str, ExperimentConfig], state: Reproduction,
              say: Callable[[str], None] = print, poll_s: float = 1.0) -> None:
    """Train every run of ``experiments`` on the connected Ray cluster, as the module
    docstring describes; fills ``state`` and saves it at every change."""
    import ray

    from ..tuner import DRIVER_RESOURCES

    task = ray.remote(num_cpus=0, resources=DRIVER_RESOURCES, max_retries=0)(_train_task)
    capacity = ray.cluster_resources()
    previous = {r["name"]: r for r in state.previous(state.storage_path).get("runs", [])}
    by_name = {e.name: e for e in experiments}
    for e in experiments:
        run = configs[e.name].run
        record = RunRecord(e.name, amount=run.demand()[run.unit], unit=run.unit)
        if is_finished(configs[e.name]):
            old = previous.get(e.name, {})
            record.state, record.note = "finished", "finished before this command (not trained again)"
            record.started, record.finished = old.get("started"), old.get("finished")
            if record.finished is None:  # it ended after its driver died: the run folder's own times
                record.started, record.finished = folder_times(configs[e.name])
        state.records[e.name] = record
    state.save()

    running: dict[Any, str] = {}

    def config_of(name: str) -> str:
        return RunStorage(configs[name].run.storage_path, name).uri

    while True:
        held = {"GPU": 0.0, "CPU": 0.0}
        for name in running.values():
            held[state.records[name].unit] += state.records[name].amount
        for e in experiments:
            record = state.records[e.name]
            if record.state != "waiting":
                continue
            if e.needs and state.records[e.needs].state in ("failed", "skipped"):
                record.state, record.error = "skipped", f"needs {e.needs}, which {state.records[e.needs].state}"
                say(f"skip   {e.name}: {record.error}")
                state.save()
                continue
            if e.needs and state.records[e.needs].state != "finished":
                continue
            if held[record.unit] + record.amount > capacity.get(record.unit, 0) + 1e-9:
                continue
            config = configs[e.name]
            if e.needs:
                general = RunStorage(config.run.storage_path, by_name[e.needs].name).uri
                config.model.weights = run_folder.find_checkpoint(general)
            resumed = RunStorage(config.run.storage_path, config.run.name).exists(run_folder.METRICS)
            running[task.remote(config.to_dict())] = e.name
            held[record.unit] += record.amount
            record.state, record.started = "running", time.time()
            say(f"{'resume' if resumed else 'start'} {e.name} ({config.model.name}, {config.optim.epochs} epochs, "
                f"{config.run.max_workers} workers, {record.amount:g} {record.unit}s)")
            state.save()
        if not running:
            break
        done, _ = ray.wait(list(running), num_returns=1, timeout=poll_s)
        for ref in done:
            name = running.pop(ref)
            record = state.records[name]
            try:
                result = ray.get(ref)
            except Exception as err:  # one failed run stops only the runs that need it
                record.state, record.finished, record.error = "failed", time.time(), error_line(err)
                say(f"FAILED {name}: {record.error} (its logs: {storage.join(config_of(name), 'logs')})")
            else:
                record.state, record.started, record.finished = "finished", result["started"], result["finished"]
                final = result["final"]
                say(f"done   {name}: top-1 {final.get('val_top1', math.nan):.1f} %, top-5 "
                    f"{final.get('val_top5', math.nan):.1f} % in {(record.finished - record.started) / 60:.1f} min")
            state.save()


def _evaluate_task(storage_path: str, shards: str, general: str, specialists: list[str], umap_samples: int) -> dict[str, Any]:
    """Inside a Ray task: the routed ensemble (Table 3) and the UMAP figure (Fig. 3) of the
    general ResNet-34, written into its run folder."""
    import ray

    from ...analysis.umap_plot import embed_and_project, plot_umap
    from ...evaluation.ensemble_eval import evaluate_ensemble

    general_dir = storage.join(storage_path, general)
    done: dict[str, Any] = {"node": ray.get_runtime_context().get_node_id()}
    if specialists:
        evaluate_ensemble(general_dir, [storage.join(storage_path, s) for s in specialists], shards)
        done["ensemble"] = specialists
    frame = embed_and_project(general_dir, shards, max_samples=umap_samples or None)
    plot_umap(frame, storage.join(general_dir, run_folder.UMAP_PNG), f"UMAP of {general}'s test-set features")
    done["umap"] = len(frame)
    return done


def evaluation_is_current(storage_path: str, specialists: Sequence[str]) -> bool:
    """Whether the general run's ensemble (of exactly ``specialists``) and UMAP figure are
    newer than the final evaluation of every run they read (a rerun then skips them)."""
    general = RunStorage(storage_path, GENERAL)
    outputs = [run_folder.UMAP_PNG] + ([run_folder.ENSEMBLE] if specialists else [])
    written = [general.mtime(name) for name in outputs]
    inputs = [RunStorage(storage_path, name).mtime(run_folder.EVALUATION) for name in (GENERAL, *specialists)]
    if None in written or None in inputs or min(written) < max(inputs):
        return False
    if not specialists:
        return True
    used = run_folder.read_json(general, run_folder.ENSEMBLE).get("specialists", [])
    return [storage.basename(s) for s in used] == list(specialists)


def evaluate(state: Reproduction, shards: str, umap_samples: int = 20_000, say: Callable[[str], None] = print) -> None:
    """Ensemble and UMAP once their runs have finished, as one Ray task (one GPU if the
    cluster has any, else one CPU; not in the driver); recorded in ``state.steps``."""
    import ray

    records = state.records
    if records.get(GENERAL) is None or records[GENERAL].state != "finished":
        return
    specialists = [s for s in SPECIALISTS if s in records and records[s].state == "finished"]
    if evaluation_is_current(state.storage_path, specialists):
        state.steps["evaluate"] = {"state": "finished", "note": "newer than the runs they read: not evaluated again"}
        say("skip   ensemble and UMAP: newer than the runs they read")
        state.save()
        return
    gpu = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1, max_retries=0)(_evaluate_task)
    started = time.time()
    try:
        done = ray.get(task.remote(state.storage_path, shards, GENERAL, specialists, umap_samples))
    except Exception as err:
        state.steps["evaluate"] = {"state": "failed", "error": error_line(err)}
        say(f"FAILED ensemble / UMAP: {state.steps['evaluate']['error']}")
    else:
        state.steps["evaluate"] = {"state": "finished", "seconds": time.time() - started, **done}
        say(f"done   ensemble ({', '.join(specialists) or 'no specialist'}) and UMAP of {done['umap']} test images")
    state.save()
