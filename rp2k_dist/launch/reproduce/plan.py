"""``rp2k reproduce --plan``: the graph's runs with their epochs x images, GPU-hours and the
wall time the scheduler of :mod:`.graph` would take on a given number of GPUs.

Nothing trains and nothing is written: image counts come from a packed dataset's manifest
or from the paper's Table 1, and throughput from given (or assumed) img/s per GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ... import storage
from ...config import ExperimentConfig, parse_meta_category
from ...errors import ConfigError
from .graph import Experiment, build_configs, select

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
        gpus = config.run.demand().get("GPU", float(config.run.max_workers))  # a CPU preset: 1 GPU per worker
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
    from ...data.manifest import Manifest

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

        from ..console import ray_init_options
        from ..trainer import ray_address

        ray.init(address=ray_address(address), **ray_init_options(False))
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if not gpus:
            raise ConfigError("the cluster has no GPUs; give --gpus N to plan for N GPUs")
    rates = {**DEFAULT_IMG_PER_S, **img_per_s}
    given = ", ".join(f"{m} {rates[m]:,.0f}" for m in sorted(rates))
    planned = plan_runs(experiments, configs, manifest_counts if shards else paper_counts, rates)
    return format_plan(planned, gpus, f"{source}; training img/s per GPU: {given}"
                       + ("" if img_per_s else " (assumed: pass --img-per-s MODEL=N with your GPU's figures)"))
