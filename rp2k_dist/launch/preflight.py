"""Checks in the driver before any Ray worker starts, and which errors a restart cannot fix.

A wrong path or value should cost seconds, not a worker-group start, a restart and a
page of tracebacks. :func:`preflight` runs every check that needs no worker (manifest,
crop size, meta-category, weights, P x K batches, cluster resources, storage) and raises one
:class:`PreflightError` listing every problem, one line each, naming the key and the fix.

Errors raised inside a worker that a restart would only repeat (an
:class:`~rp2k_dist.errors.Rp2kError` that is not ``retryable``) end the run at once instead
of using ``run.max_failures``; worker and node deaths still restart from the last checkpoint.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from ..config import ExperimentConfig, parse_meta_category
from ..data.manifest import INDEX_PARQUET, Manifest
from ..errors import ConfigError, ManifestError, MetaCategoryError, PreflightError, Rp2kError, is_retryable


def preflight(config: ExperimentConfig, resources: dict[str, float] | None) -> None:
    """Raise :class:`PreflightError` listing every problem of ``config`` that can be seen
    from the driver. ``resources``: the cluster's total ``{"CPU": n, "GPU": m}`` (None skips
    the resource check)."""
    problems: list[str] = []
    _check_crop_size(config, problems)
    manifest = _check_manifest(config, problems)
    classes = _check_meta_category(config, manifest, problems) if manifest is not None else None
    _check_weights(config, len(classes) if classes is not None else None, problems)
    if manifest is not None and classes is not None and "train" in manifest.data.get("splits", {}):
        _check_batches(config, manifest, _seen_classes(config, manifest, classes, problems), problems)
    if resources is not None:
        problems += _resource_problems(config, resources)
    _check_storage(config, problems)
    if problems:
        raise PreflightError(problems)


def _check_manifest(config: ExperimentConfig, problems: list[str]) -> Manifest | None:
    shards = config.data.shards
    try:
        manifest = Manifest.load(shards)
    except ManifestError as err:
        problems.append(f"data.shards: {err}")
        return None
    for split in ("train", "test"):
        if split not in manifest.data.get("splits", {}):
            problems.append(f"data.shards: {shards} has no {split!r} split; repack it with `rp2k pack`")
    if manifest.uri is None:  # object stores are listed by the loader; local gaps are cheap to see here
        names = [INDEX_PARQUET] + [s["name"] for split in manifest.data.get("splits", {}).values() for s in split["shards"]]
        missing = [n for n in names if not (manifest.root / n).is_file()]
        if missing:
            problems.append(f"data.shards: {len(missing)} file(s) of the manifest are missing in {shards} "
                            f"(e.g. {missing[0]}); finish or redo `rp2k pack`")
    return manifest


def _check_crop_size(config: ExperimentConfig, problems: list[str]) -> None:
    from ..models import input_spec

    try:
        input_spec(config.model.name, config.model.crop_size or None)
    except ConfigError as err:
        problems.append(f"model.crop_size: {err}; raise it or set 0 for the model's own size")


def _check_meta_category(config: ExperimentConfig, manifest: Manifest, problems: list[str]) -> list[int] | None:
    if not config.data.meta_category:
        return list(range(manifest.num_classes))
    system, value = parse_meta_category(config.data.meta_category)
    try:
        return manifest.classes_of(system, value)
    except MetaCategoryError as err:
        problems.append(str(err))
        return None


def _check_weights(config: ExperimentConfig, num_classes: int | None, problems: list[str]) -> None:
    """The weights file exists and loads into the model (on CPU, in seconds)."""
    from ..models import create_model
    from ..models.weights import downloads_allowed, imagenet_file

    m = config.model
    if m.pretrained == "imagenet":
        try:
            path = imagenet_file(m.name)
        except ConfigError as err:
            problems.append(f"model.pretrained: {err}")
            return
        if not path.is_file() and not downloads_allowed():
            # an online node downloads it once (models/weights.py); offline, say what to put where
            problems.append(f"model.pretrained: {path} is missing and RP2K_OFFLINE=1 forbids downloading it; "
                            f"place torchvision's {path.name} there or set model.pretrained=''")
            return
    if not m.weights:
        return
    if "://" not in m.weights and not Path(m.weights).is_file():
        problems.append(f"model.weights: file {m.weights} not found; give an existing weights file or checkpoint.pt")
        return
    if num_classes is None or "://" in m.weights:
        return
    try:
        create_model(m.name, num_classes, weights=m.weights)
    except (Rp2kError, KeyError, RuntimeError) as err:
        problems.append(f"model.weights: {m.weights} does not fit {m.name}: {err}")


def _seen_classes(config: ExperimentConfig, manifest: Manifest, classes: list[int], problems: list[str]) -> list[int]:
    """``classes`` less the unseen ones (``data.holdout_classes``), which never train."""
    from ..data.holdout import held_out_classes

    try:
        unseen = set(held_out_classes(manifest.classes, config.data.holdout_classes))
    except ConfigError as err:
        problems.append(str(err))
        return classes
    return [c for c in classes if c not in unseen]


def _check_batches(config: ExperimentConfig, manifest: Manifest, classes: list[int], problems: list[str]) -> None:
    """Every rank needs one full batch; P x K batches need P classes with >= 2 train
    images (an intra-class pair)."""
    counts = manifest.class_counts("train")
    train = sum(counts[c] for c in classes)
    workers = config.run.max_workers
    per_rank = train // workers
    p, k = config.data.classes_per_batch, config.data.images_per_class
    batch, key = (p * k, "data.classes_per_batch x data.images_per_class") if p else (config.data.batch_size, "data.batch_size")
    if config.optim.global_batch:
        if train < config.optim.global_batch:
            problems.append(f"optim.global_batch: {config.optim.global_batch} images per step, but the run has "
                            f"{train} train images; lower it")
    elif per_rank < batch:
        problems.append(f"{key}: batches of {batch} images, but each of the {workers} workers gets about "
                        f"{per_rank} train images; lower it or run.workers")
    pairable = sum(counts[c] >= 2 for c in classes)
    if p and pairable < p:
        problems.append(f"data.classes_per_batch: {p} classes per batch, but only {pairable} of the run's "
                        f"{len(classes)} classes have 2+ train images; set data.classes_per_batch <= {pairable}")


def check_resources(config: ExperimentConfig, resources: dict[str, float]) -> None:
    """:class:`PreflightError` when the cluster (``ray.cluster_resources()``) is too small."""
    problems = _resource_problems(config, resources)
    if problems:
        raise PreflightError(problems)


def _resource_problems(config: ExperimentConfig, resources: dict[str, float]) -> list[str]:
    """What the run's workers ask for that the cluster does not have in total (Ray would
    otherwise wait for it forever)."""
    r = config.run
    workers = r.min_workers  # an elastic run starts once its minimum fits (and grows as nodes join)
    wanted = r.demand(workers)
    per_worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker}
    fixes = {"CPU": "lower run.workers or run.cpus_per_worker", "GPU": "lower run.workers, or run.use_gpu=false"}
    return [f"run.workers x run.{unit.lower()}s_per_worker: {workers} x {per_worker[unit]:g} = {amount:g} {unit}s, "
            f"the cluster has {resources.get(unit, 0):g}; {fixes[unit]}"
            for unit, amount in wanted.items() if amount > resources.get(unit, 0)]


def local_resources() -> dict[str, float]:
    """What a new local Ray on this machine will offer: its CPUs and visible GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def _check_storage(config: ExperimentConfig, problems: list[str]) -> None:
    """``run.storage_path`` accepts a file (a probe is written and deleted)."""
    path = config.run.storage_path
    try:
        if "://" in path:
            fs, base = pafs.FileSystem.from_uri(path)
        else:
            fs, base = pafs.LocalFileSystem(), str(Path(path).resolve())
        fs.create_dir(base, recursive=True)
        probe = f"{base.rstrip('/')}/.rp2k-write-probe-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:  # pyarrow's I/O errors are OSErrors
        problems.append(f"run.storage_path: cannot write to {path} ({err}); choose a writable folder or bucket")


def first_not_retryable(worker_failures: dict[int, BaseException]) -> Rp2kError | None:
    """The lowest rank's error that the next attempt would repeat, if any (the driver
    raises it as it is: one line for the user instead of every rank's traceback)."""
    for _, error in sorted(worker_failures.items()):
        if not is_retryable(error):
            return error
    return None
