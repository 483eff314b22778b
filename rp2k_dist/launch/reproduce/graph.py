"""``rp2k reproduce``: the paper's experiments as one graph of ordinary training runs.

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
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import run_folder, storage
from ..config import ConfigError, ExperimentConfig, load_config, parse_meta_category
from ..storage import RunStorage

STATE_FILE = "reproduce.json"
REPORT_FILE = "reproduce.md"
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

#: Training img/s per GPU assumed by ``--plan`` when none is given: timm's published
#: RTX 3090 figures (AMP, channels_last) for ResNet-34 at 224 px and InceptionV3 at 299 px;
#: API-Net's trunk is a ResNet-34 and its pair heads are small. Measure yours with
#: ``bench/train_throughput.py`` and pass ``--img-per-s resnet34=...``.
DEFAULT_IMG_PER_S = {"resnet34": 2037.0, "inception_v3": 782.0, "apinet": 1800.0}
#: Evaluation (forward only) runs about this many times faster than a training step.
EVAL_SPEEDUP = 3.0

#: RP2K's image counts (the paper's Table 1) for ``--plan --counts paper``, before packing.
PAPER_COUNTS = {"train": 344_854, "test": 39_457,
                "liquor": {"train": 16_753, "test": 1_939}, "cosmetics": {"train": 7_393, "test": 932}}


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
    from .preflight import PreflightError, preflight

    problems = []
    for e in experiments:
        try:
            preflight(configs[e.name], resources)
        except PreflightError as err:
            problems += [f"{e.name} ({e.preset}): {line}" for line in err.problems]
    if problems:
        raise PreflightError(problems)


def demand(config: ExperimentConfig) -> tuple[str, float]:
    """The resource a run's workers hold while it trains: ("GPU", n) or ("CPU", n)."""
    r = config.run
    workers = r.max_workers  # an elastic run may grow to its maximum
    return ("GPU", workers * r.gpus_per_worker) if r.use_gpu else ("CPU", workers * r.cpus_per_worker)


def is_finished(config: ExperimentConfig) -> bool:
    """The run has evaluated its last planned epoch (``evaluation.json`` of that epoch)."""
    folder = RunStorage(config.run.storage_path, config.run.name)
    if not folder.exists(run_folder.EVALUATION):
        return False
    final = json.loads(folder.read_bytes(run_folder.EVALUATION)).get("final", {})
    return int(final.get("epoch", 0)) >= config.optim.epochs


def folder_times(config: ExperimentConfig) -> tuple[float | None, float | None]:
    """(start, end) unix times of a run from its folder: when rank 0 wrote ``config.yaml``
    (at the start of its last attempt) and its final ``evaluation.json``."""
    folder = RunStorage(config.run.storage_path, config.run.name)

    def mtime(name: str) -> float | None:
        info = storage.file_info(folder.location(name))
        return info.mtime.timestamp() if info.mtime is not None else None

    return mtime(run_folder.CONFIG), mtime(run_folder.EVALUATION)


# --------------------------------------------------------------------------- the plan


@dataclass
class PlannedRun:
    name: str
    model: str
    epochs: int
    train_images: int
    test_images: int
    evaluations: int
    gpus: float
    img_per_s: float
    needs: str | None

    @property
    def gpu_seconds(self) -> float:
        return (self.epochs * self.train_images + self.evaluations * self.test_images / EVAL_SPEEDUP) / self.img_per_s

    @property
    def wall_seconds(self) -> float:
        return self.gpu_seconds / self.gpus  # data parallel, linear scaling assumed


def plan_runs(experiments: Sequence[Experiment], configs: dict[str, ExperimentConfig],
              counts: Callable[[ExperimentConfig], tuple[int, int]], img_per_s: dict[str, float]) -> list[PlannedRun]:
    """Each run's epochs x images and GPU time; ``counts(config)``: its (train, test) images."""
    planned = []
    for e in experiments:
        config = configs[e.name]
        train, test = counts(config)
        model = config.model.name
        if model not in img_per_s:
            raise ConfigError(f"--img-per-s has no figure for {model} (give {model}=IMG_PER_S)")
        evaluations = len([epoch for epoch in range(1, config.optim.epochs + 1)
                           if epoch % config.run.eval_every == 0 or epoch == config.optim.epochs])
        unit, amount = demand(config)
        gpus = amount if unit == "GPU" else config.run.max_workers  # a CPU preset planned as 1 GPU per worker
        planned.append(PlannedRun(e.name, model, config.optim.epochs, train, test, evaluations, gpus,
                                  img_per_s[model], e.needs))
    return planned


def simulate(planned: Sequence[PlannedRun], gpus: float) -> dict[str, tuple[float, float]]:
    """(start, end) seconds of each run when the driver's rule runs them on ``gpus`` GPUs:
    in graph order, each as soon as its input exists and its GPUs are free."""
    for run in planned:
        if run.gpus > gpus:
            raise ConfigError(f"{run.name} needs {run.gpus:g} GPUs, the plan has {gpus:g}")
    times: dict[str, tuple[float, float]] = {}
    running: list[tuple[float, float]] = []  # (end, GPUs) of the runs started
    waiting = list(planned)
    now = 0.0
    while waiting:
        free = gpus - sum(held for end, held in running if end > now)
        started = False
        for run in list(waiting):
            ready = run.needs is None or (run.needs in times and times[run.needs][1] <= now)
            if ready and run.gpus <= free + 1e-9:
                times[run.name] = (now, now + run.wall_seconds)
                running.append((now + run.wall_seconds, run.gpus))
                free -= run.gpus
                waiting.remove(run)
                started = True
        if not started:
            now = min(end for end, _ in running if end > now)
    return times


def format_plan(planned: Sequence[PlannedRun], gpus: float, source: str) -> str:
    times = simulate(planned, gpus)
    lines = [f"plan on {gpus:g} GPUs ({source}):", ""]
    header = f"{'run':26} {'model':13} {'needs':16} {'epochs x images':>20} {'GPUs':>5} {'img/s/GPU':>9} " \
             f"{'GPU-h':>7} {'start h':>8} {'end h':>7}"
    lines += [header, "-" * len(header)]
    for run in planned:
        start, end = times[run.name]
        lines.append(f"{run.name:26} {run.model:13} {run.needs or '-':16} "
                     f"{f'{run.epochs} x {run.train_images:,}':>20} {run.gpus:>5g} {run.img_per_s:>9,.0f} "
                     f"{run.gpu_seconds / 3600:>7.1f} {start / 3600:>8.1f} {end / 3600:>7.1f}")
    total = sum(run.gpu_seconds for run in planned) / 3600
    wall = max(end for _, end in times.values()) / 3600
    lines += ["", f"total {total:.1f} GPU-hours; wall time {wall:.1f} h on {gpus:g} GPUs "
              f"(training + evaluation at {EVAL_SPEEDUP:g}x the training img/s; linear data-parallel scaling; "
              "the ensemble, UMAP and report steps add minutes)"]
    return "\n".join(lines)


def manifest_counts(config: ExperimentConfig) -> tuple[int, int]:
    """(train, test) images of the run's classes in its packed dataset."""
    from ..data.manifest import Manifest

    manifest = Manifest.load(config.data.shards)
    classes = range(manifest.num_classes)
    if config.data.meta_category:
        classes = manifest.classes_of(*parse_meta_category(config.data.meta_category))
    train, test = manifest.class_counts("train"), manifest.class_counts("test")
    return sum(train[c] for c in classes), sum(test[c] for c in classes)


def paper_counts(config: ExperimentConfig) -> tuple[int, int]:
    """(train, test) images of the run's classes in RP2K as the paper counts them."""
    if not config.data.meta_category:
        return PAPER_COUNTS["train"], PAPER_COUNTS["test"]
    _, value = parse_meta_category(config.data.meta_category)
    if value not in PAPER_COUNTS:
        raise ConfigError(f"the paper's Table 1 counts have no {value!r}; plan from a packed dataset (--shards)")
    return PAPER_COUNTS[value]["train"], PAPER_COUNTS[value]["test"]


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
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # ensemble, umap, report

    def save(self) -> None:
        storage.write_bytes(storage.join(self.storage_path, STATE_FILE), json.dumps(
            {"runs": [r.to_dict() for r in self.records.values()], "steps": self.steps}, indent=1).encode())

    @staticmethod
    def previous(storage_path: str) -> dict[str, Any]:
        location = storage.join(storage_path, STATE_FILE)
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
    from ..config import config_from_dict
    from .ray_private import drop_placement_group_cleaner
    from .trainer import build_trainer, fit

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

    from .trainer import storage_uri
    from .tuner import DRIVER_RESOURCES

    task = ray.remote(num_cpus=0, resources=DRIVER_RESOURCES, max_retries=0)(_train_task)
    capacity = ray.cluster_resources()
    previous = {r["name"]: r for r in state.previous(state.storage_path).get("runs", [])}
    by_name = {e.name: e for e in experiments}
    for e in experiments:
        unit, amount = demand(configs[e.name])
        record = RunRecord(e.name, amount=amount, unit=unit)
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
                config.model.weights = storage_uri(run_folder.find_checkpoint(general))
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
    from ..analysis.umap_plot import embed_and_project, plot_umap
    from ..evaluation.ensemble_eval import evaluate_ensemble

    general_dir = Path(storage_path) / general
    done: dict[str, Any] = {}
    if specialists:
        evaluate_ensemble(general_dir, [Path(storage_path) / s for s in specialists], shards)
        done["ensemble"] = specialists
    frame = embed_and_project(general_dir, shards, max_samples=umap_samples or None)
    plot_umap(frame, general_dir / run_folder.UMAP_PNG, f"UMAP of {general}'s test-set features")
    done["umap"] = len(frame)
    return done


def evaluate(state: Reproduction, shards: str, umap_samples: int = 20_000, say: Callable[[str], None] = print) -> None:
    """Ensemble and UMAP once their runs have finished (a Ray task on a GPU if the cluster
    has one); recorded in ``state.steps``."""
    import ray

    records = state.records
    if records.get(GENERAL) is None or records[GENERAL].state != "finished":
        return
    if storage.is_uri(state.storage_path):
        state.steps["evaluate"] = {"state": "skipped", "error": "the ensemble and UMAP read run folders from a local "
                                   "or mounted storage path, not from object storage"}
        say(f"skip   ensemble and UMAP: {state.steps['evaluate']['error']}")
        return
    specialists = [s for s in SPECIALISTS if s in records and records[s].state == "finished"]
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


# --------------------------------------------------------------------------- the report


def _hours(record: RunRecord) -> float:
    if record.started is None or record.finished is None:
        return math.nan
    return (record.finished - record.started) / 3600


def write_report(state: Reproduction, configs: dict[str, ExperimentConfig]) -> Path:
    """``reproduce.md`` in the storage path: every table of the paper with the paper's
    numbers beside ours, the UMAP figure and the GPU-hours spent."""
    from ..analysis.report import REAL_RP2K_MIN_CLASSES, Run, _markdown_rows, compare_runs
    from ..evaluation.ensemble import table3_markdown
    from ..evaluation.metrics import PAPER_TABLE2, format_percent

    root = Path(state.storage_path)
    runs = {name: Run.read(root / name) for name, r in state.records.items() if r.state == "finished"}
    manifest = next(iter(runs.values())).manifest() if runs else None
    real = manifest is not None and manifest.num_classes >= REAL_RP2K_MIN_CLASSES
    out = ["# The paper reproduced", ""]
    out.append(f"Dataset: {manifest.num_classes if manifest else '?'} classes"
               + ("" if real else " (not RP2K's 2,388: the paper's numbers are shown for reference only)") + ".")
    out += ["", "## Runs", ""]
    rows = []
    for name, record in state.records.items():
        config = configs[name]
        run = runs.get(name)
        train_s = sum(m.get("epoch_seconds", 0.0) for m in run.metrics) if run else math.nan
        rows.append([name, config.model.name, record.state, f"{record.amount:g} {record.unit}",
                     f"{_hours(record) * 60:.1f}", f"{train_s / 60:.1f}",
                     f"{_hours(record) * record.amount:.2f} {record.unit}-h", record.error or record.note or ""])
    out.append(_markdown_rows(["run", "model", "state", "workers hold", "wall min", "train min", "cost", "note"],
                              rows, text_columns=4))
    spent = {unit: sum(_hours(r) * r.amount for r in state.records.values() if r.unit == unit and r.state == "finished")
             for unit in sorted({r.unit for r in state.records.values()})}
    out.append("Cost spent: " + ", ".join(f"{hours:.2f} {unit}-hours" for unit, hours in spent.items())
               + " (each finished run's wall time x the GPUs, or CPUs, its workers hold; 'train min' is the runs' "
               "own per-epoch timings summed).")

    out += ["", "## Table 2: top-1 / top-5 per meta-category", ""]
    for name in (GENERAL, "table2-inception-v3"):
        if name in runs and runs[name].table2 is not None:
            paper = PAPER_TABLE2.get(runs[name].model)
            out += [f"### {name} ({runs[name].model})", "", runs[name].table2.to_markdown(paper), ""]

    out += ["## Table 3: general model and the routed ensemble, within the meta-category", ""]
    ensemble = runs[GENERAL].ensemble if GENERAL in runs else None
    out.append(table3_markdown(ensemble["table3"]) if ensemble else "Not evaluated (the general model or both "
               "specialists did not finish).")

    out += ["", "## Table 4: from scratch / transfer learning, without / with augmentation", ""]
    table4 = [root / n for n in TABLE4 if n in runs]
    if table4:
        compare = compare_runs(table4, root / "table4.md")
        out.append(compare.read_text(encoding="utf-8").split("\n", 2)[2].strip())
    else:
        out.append("No Table 4 run finished.")

    out += ["", "## Class-Balanced Loss ablation", ""]
    cbl = [n for n in (GENERAL, "cbl-off") if n in runs]
    out.append(_markdown_rows(["run", "CBL beta", "top-1", "top-5", "macro top-1"], [
        [n, f"{runs[n].config['loss']['cbl_beta']:g}", *(format_percent(runs[n].final()[k]) for k in ("top1", "top5", "macro"))]
        for n in cbl]) if cbl else "No ablation run finished.")

    out += ["", "## Fig. 3: UMAP of the general model's features", ""]
    umap = root / GENERAL / run_folder.UMAP_PNG
    out.append(f"![UMAP]({GENERAL}/{run_folder.UMAP_PNG})" if umap.exists() else "Not drawn.")
    path = root / REPORT_FILE
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------- entry point


def reproduce(shards: str, storage_path: str, only: Sequence[str] | None = None, sets: Sequence[str] = (),
              address: str | None = None, verbose: bool = False, umap_samples: int = 20_000) -> int:
    """The whole reproduction on the Ray cluster at ``address``; 0 when every run finished."""
    import ray

    from .console import ray_init_options
    from .trainer import cluster_line, ray_address, storage_uri

    shards, storage_path = storage_uri(shards), storage_uri(storage_path)
    experiments = select(only)
    configs = build_configs(experiments, shards, storage_path, sets)
    if not ray.is_initialized():
        ray.init(address=ray_address(address), **ray_init_options(verbose))
    print(cluster_line(ray_address(address) == "local"), flush=True)
    check_inputs(experiments, configs, ray.cluster_resources())
    print(f"{len(experiments)} runs under {storage.display(storage_path)}: {', '.join(e.name for e in experiments)}",
          flush=True)
    state = Reproduction(storage_path)
    run_graph(experiments, configs, state, say=lambda line: print(line, flush=True))
    evaluate(state, shards, umap_samples, say=lambda line: print(line, flush=True))
    if not storage.is_uri(storage_path):
        print(f"report: {write_report(state, configs)}", flush=True)
    failed = {n: r for n, r in state.records.items() if r.state != "finished"}
    for name, record in failed.items():
        print(f"{name}: {record.state}: {record.error}", flush=True)
    return 1 if failed else 0


def plan(shards: str | None, only: Sequence[str] | None, sets: Sequence[str], gpus: float | None,
         img_per_s: dict[str, float], address: str | None = None) -> str:
    """``--plan``: the graph with each run's epochs x images, GPU-hours and wall time.
    Image counts from the packed dataset at ``shards``, or the paper's Table 1 when
    ``shards`` is None; GPUs from ``gpus``, else from the cluster at ``address``."""
    experiments = select(only)
    configs = build_configs(experiments, shards or "shards/rp2k", "runs/reproduce", sets)
    source = f"images of {storage.display(shards)}" if shards else "RP2K's image counts from the paper's Table 1"
    if gpus is None:
        import ray

        from .console import ray_init_options
        from .trainer import ray_address

        ray.init(address=ray_address(address), **ray_init_options(False))
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if not gpus:
            raise ConfigError("the cluster has no GPUs; give --gpus N to plan for N GPUs")
    rates = {**DEFAULT_IMG_PER_S, **img_per_s}
    given = ", ".join(f"{m} {rates[m]:,.0f}" for m in sorted(rates))
    planned = plan_runs(experiments, configs, manifest_counts if shards else paper_counts, rates)
    return format_plan(planned, gpus, f"{source}; training img/s per GPU: {given}"
                       + ("" if img_per_s else " (assumed: pass --img-per-s MODEL=N with your GPU's figures)"))
