"""The run folder: the name of every artefact a run leaves, and how each is read back.

One training run is ``<run.storage_path>/<run.name>/`` (a local folder, or s3:// / gs://
through :class:`~rp2k_dist.storage.RunStorage`)::

    config.yaml                  the resolved ExperimentConfig (written at start)
    metrics.jsonl                one JSON object per epoch, rewritten whole (a resume never duplicates)
    epoch_NNNN/checkpoint.pt     checkpoints, the same layout for local and Ray Train runs
    epoch_NNNN_step_SSSSSSS/     mid-epoch checkpoints (run.checkpoint_every_steps)
    predictions.parquet          top-5 of every test sample at the last epoch
    evaluation.json, table2.md   Table 2, the most-confused pairs and the final metrics
    ranks/rank-N.json            per-rank parameter digests (only with run.rank_digests)
    preemptions.jsonl            one JSON object per node drain notice: nodes, deadline, the checkpoint saved
    ensemble.json, table3.md, ensemble_table2.md, ensemble_*predictions.parquet   ``rp2k ensemble``
    umap.png, umap.parquet       ``rp2k umap``
    report/report.{md,html}      ``rp2k report`` (with the PNGs the Markdown links)

A sweep (``rp2k tune``) is ``<run.storage_path>/<run.name>/`` with ``base.yaml``,
``best.yaml``, ``trials.{parquet,csv}`` and ``trials/<trial id>/`` (a run folder plus
``trial.json``); a reproduction (``rp2k reproduce``) keeps ``reproduce.json``,
``reproduce.md``, ``reproduce.html`` and ``table4.md`` beside its run folders.

Every name below is the only spelling of its artefact in the project; readers and writers
go through :mod:`rp2k_dist.storage` (local, mounted, s3:// or gs:// alike).

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)`` (no pickled code runs on load).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import storage
from .errors import CheckpointError
from .storage import RunStorage

if TYPE_CHECKING:  # torch is imported when a checkpoint is: naming artefacts stays light
    import torch

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
PREDICTIONS = "predictions.parquet"
EVALUATION = "evaluation.json"
TABLE2 = "table2.md"
RANKS = "ranks"
PREEMPTIONS = "preemptions.jsonl"
ENSEMBLE = "ensemble.json"
TABLE3 = "table3.md"
ENSEMBLE_TABLE2 = "ensemble_table2.md"
ENSEMBLE_PREDICTIONS = "ensemble_predictions.parquet"
ENSEMBLE_MASS_PREDICTIONS = "ensemble_mass_predictions.parquet"
ENSEMBLE_GENERAL_PREDICTIONS = "ensemble_general_predictions.parquet"
OPENSET = "openset.json"  # `rp2k openset`: recall of unseen classes, AUROC, FAR (rp2k_dist.evaluation.openset)
OPENSET_TABLE = "openset.md"
UMAP_PNG = "umap.png"
UMAP_PARQUET = "umap.parquet"
WEIGHTS_LOAD = "weights_load.json"
LOGS = "logs"  # logs/rank-N.log: each worker's output
TENSORBOARD = "tensorboard"
PROGRESS = "progress.json"  # rank 0's step within the epoch, for the driver's progress bar

# ``rp2k report`` (a folder, by default ``<run>/report``) and ``rp2k compare``
REPORT_DIR = "report"
REPORT = "report"  # the stem of report.md and report.html
CURVES_PNG = "curves.png"
CATEGORIES_PNG = "categories.png"
CONFUSIONS_PNG = "confusions.png"
COMPARE = "compare.md"

# ``rp2k tune``: the sweep folder
SWEEP_BASE = "base.yaml"
BEST = "best.yaml"
TRIALS = "trials"
TRIALS_PARQUET = "trials.parquet"
TRIALS_CSV = "trials.csv"
TRIAL_RECORD = "trial.json"

# ``rp2k reproduce``: beside the run folders in its storage path
REPRODUCE_STATE = "reproduce.json"
REPRODUCE = "reproduce"  # the stem of reproduce.md and reproduce.html
TABLE4 = "table4.md"

# ``rp2k export``: each file with its model card ``<file>.json``
MODEL_ONNX = "model.onnx"
MODEL_SAFETENSORS = "model.safetensors"

def ensemble_category_predictions(category: str, part: str) -> str:
    """Table 3's per-category predictions: ``part`` "specialist" (c) or "restricted" (b)."""
    return f"ensemble_{category}_{part}.parquet"


def model_card(weights: str) -> str:
    """The model card of an exported file (``model.onnx`` -> ``model.onnx.json``)."""
    return f"{weights}.json"


FORMAT = "rp2k-dist-checkpoint"
VERSION = 1


# --------------------------------------------------------------------------- checkpoints


def checkpoint_dir(epoch: int, global_step: int | None = None) -> str:
    """The folder of a checkpoint: ``epoch_NNNN`` after ``epoch`` epochs, or
    ``epoch_NNNN_step_SSSSSSS`` at ``global_step`` inside epoch NNNN+1 (sorted by name =
    sorted by progress)."""
    name = f"epoch_{epoch:04d}"
    return name if global_step is None else f"{name}_step_{global_step:07d}"


def checkpoint_dir_of(checkpoint: dict[str, Any]) -> str:
    """The folder a checkpoint is written to: mid-epoch ones carry an ``epoch_state``."""
    state = checkpoint.get("epoch_state")
    return checkpoint_dir(checkpoint["epoch"], state["global_step"] if state else None)


def checkpoint_dirs(run: RunStorage | str | Path) -> list[str]:
    """The run's checkpoint folders (relative to the run), oldest first.
    ``run``: its :class:`RunStorage`, or its location (a local path or a URI)."""
    location = run.uri if isinstance(run, RunStorage) else str(run)
    return sorted(n for n in storage.listdir(location) if n.startswith("epoch_"))


def to_bytes(checkpoint: dict[str, Any]) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load_checkpoint(source: str | Path | bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint file, its folder (local or a URI), or its bytes, with
    ``weights_only=True``."""
    import torch

    if isinstance(source, (str, Path)):
        location = str(source)
        if storage.is_dir(location):
            location = storage.join(location, CHECKPOINT)
        if not storage.is_file(location):
            raise CheckpointError(f"checkpoint {storage.display(location)} not found")
        if storage.is_uri(location):
            data = torch.load(io.BytesIO(storage.read_bytes(location)), map_location=map_location, weights_only=True)
        else:
            data = torch.load(location, map_location=map_location, weights_only=True)
    else:
        data = torch.load(io.BytesIO(source), map_location=map_location, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{source if not isinstance(source, bytes) else 'data'} is not an rp2k-dist checkpoint")
    if data.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {data.get('version')} is not {VERSION}")
    return data


def resume_mismatch(checkpoint: dict[str, Any], model_name: str, class_names: list[str]) -> str | None:
    """Why the run's latest ``checkpoint`` cannot be resumed by a run of ``model_name`` on
    classes ``class_names`` (a run folder reused for another model or dataset), or None."""
    if checkpoint.get("model_name") != model_name:
        return f"its checkpoint holds a {checkpoint.get('model_name')}, this run trains {model_name}"
    before = [c["name"] for c in checkpoint.get("classes", [])]
    if before != class_names:
        changed = sum(a != b for a, b in zip(before, class_names)) + abs(len(before) - len(class_names))
        return (f"its checkpoint has {len(before)} classes, this run's data {len(class_names)} "
                f"({changed} differ in name or order): the shards or meta-category changed")
    return None


def find_checkpoint(path: str | Path) -> str:
    """A checkpoint file, a checkpoint folder, or a run folder (its latest checkpoint folder
    that holds a checkpoint); local or a URI (``s3://bucket/runs/NAME``). Returns the
    checkpoint file's location."""
    path = str(path)
    if storage.file_info(path).type == storage.pafs.FileType.File:
        return path
    if storage.exists(storage.join(path, CHECKPOINT)):
        return storage.join(path, CHECKPOINT)
    for folder in reversed(checkpoint_dirs(path)):
        if storage.exists(storage.join(path, folder, CHECKPOINT)):
            return storage.join(path, folder, CHECKPOINT)
    raise CheckpointError(f"no checkpoint at {storage.display(path)}: give a {CHECKPOINT}, its folder, "
                          "or a run folder with epoch_*/")


def find_run_dir(path: str | Path) -> str:
    """The run folder (local path or URI) of a run folder, checkpoint folder or checkpoint file."""
    location = str(path)
    if storage.is_file(location):
        location = storage.parent(location)
    while storage.basename(location).startswith("epoch_"):
        location = storage.parent(location)
    return location


# --------------------------------------------------------------------------- metrics


def write_metrics(storage: RunStorage, history: list[dict[str, Any]]) -> None:
    """The run's metrics history as JSON lines (rewritten whole: resumes never duplicate)."""
    storage.write_text(METRICS, "".join(json.dumps(m, sort_keys=True) + "\n" for m in history))


def read_metrics(storage: RunStorage) -> list[dict[str, Any]]:
    """The run's metrics history, one dict per epoch ([] before the first epoch ends)."""
    if not storage.exists(METRICS):
        return []
    return [json.loads(line) for line in storage.read_bytes(METRICS).decode("utf-8").splitlines() if line.strip()]


def append_preemption(storage: RunStorage, event: dict[str, Any]) -> None:
    """Add one drain notice to ``preemptions.jsonl`` (rank 0 only; the file is rewritten
    whole, as object storage cannot append)."""
    storage.write_text(PREEMPTIONS, "".join(json.dumps(e, sort_keys=True) + "\n"
                                           for e in [*read_preemptions(storage), event]))


def read_preemptions(storage: RunStorage) -> list[dict[str, Any]]:
    """The run's drain notices, oldest first ([] for a run never preempted)."""
    if not storage.exists(PREEMPTIONS):
        return []
    return [json.loads(line) for line in storage.read_bytes(PREEMPTIONS).decode("utf-8").splitlines() if line.strip()]


def read_json(folder: RunStorage, name: str) -> dict[str, Any] | None:
    """A JSON artefact of a run folder (``evaluation.json``, ``ensemble.json``), or None."""
    return json.loads(folder.read_bytes(name)) if folder.exists(name) else None


def write_json(folder: RunStorage, name: str, data: Any) -> None:
    """A JSON artefact (indented, non-ASCII kept, NumPy numbers as floats)."""
    folder.write_text(name, json.dumps(data, indent=1, ensure_ascii=False, default=float))
