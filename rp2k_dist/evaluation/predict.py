"""Top-5 SKUs for image files: a trained checkpoint (optionally with API-Net specialists
routed as in Table 3) applied with exactly the evaluation's preprocessing.

Each file goes through :class:`rp2k_dist.data.transforms.EvalTransform` on its raw bytes:
the same decode (any PIL format, transparency composited on white), resize and centre
crop as evaluation on the shards, and the same :func:`rp2k_dist.evaluation.inference.logits_of`.
Files that are not images (by suffix), cannot be read or cannot be decoded are returned in
``rejected`` with a reason; they never stop the run. Shard images were re-encoded and
resized at pack time, so an original photo and its shard copy give slightly different
scores; the shard bytes themselves give the evaluation's scores.

Image folders, checkpoints and the output table are locations of :mod:`rp2k_dist.storage`
(local, mounted, s3://, gs://); the table's ``path`` column names each file as given,
without a URI's query.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from .. import storage
from ..data.images import DECODE_ERRORS, IMAGE_SUFFIXES
from ..data.transforms import EvalTransform
from ..errors import CheckpointError, ConfigError, NotFoundError, StorageError
from .ensemble import Specialist, combine, route
from .ensemble_eval import specialist_of
from .inference import TrainedModel, load_trained, logits_of
from .predictions import Predictions

Checkpoint = str | Path | TrainedModel
#: Output formats of :func:`predict_folder`, by the output file's suffix.
FORMATS = (".parquet", ".csv", ".json")
#: Columns of the prediction table: one row per (image, rank); a rejected file has one row
#: with ``error`` and ``reason`` set and the prediction columns empty.
DTYPES = {"path": "string", "rank": "Int64", "class": "Int64", "name": "string", "product_name": "string",
          "sku": "string", "type": "string", "shape": "string", "score": "float64", "routed_to": "string",
          "error": "string", "reason": "string"}
COLUMNS = list(DTYPES)


def _load(checkpoint: Checkpoint) -> TrainedModel:
    return checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint)


def suffix(location: str | Path) -> str:
    """A file's suffix with its dot (``.jpg``), '' without one."""
    name = storage.basename(location)
    return f".{name.rsplit('.', 1)[1]}" if "." in name.lstrip(".") else ""


def prepare(path: str | Path, transform: EvalTransform) -> tuple[torch.Tensor | None, dict[str, str] | None]:
    """(uint8 CHW model input, None), or (None, ``{"path", "error", "reason"}``) when the
    file (local or a URI) is missing, not an image (suffix), unreadable or undecodable."""

    def reject(error: str, reason: str) -> tuple[None, dict[str, str]]:
        return None, {"path": storage.display(path), "error": error, "reason": reason}

    kind = suffix(path)
    if kind.lower() not in IMAGE_SUFFIXES:
        return reject("unsupported", f"not an image file: suffix {kind or '(none)'!r} is not one of "
                                     f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    try:
        data = storage.read_bytes(path)
    except (OSError, StorageError) as err:
        return reject("unreadable", f"cannot read file: {err}")
    try:
        return decode_image(data, transform), None
    except DECODE_ERRORS as err:
        return reject("corrupt", decode_error_reason(err))


def decode_image(data: bytes, transform: EvalTransform) -> torch.Tensor:
    """An image file's bytes -> the uint8 CHW model input: the one decode and preprocessing
    of ``rp2k predict``, ``rp2k gallery`` and ``rp2k serve`` (:mod:`rp2k_dist.serving`).
    Raises one of :data:`~rp2k_dist.data.images.DECODE_ERRORS` for bytes that are no image."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency chatter
        return transform(data)


def decode_error_reason(err: BaseException) -> str:
    """The reason given for bytes :func:`decode_image` could not decode."""
    message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(err))  # PIL names the buffer
    return f"cannot decode image: {type(err).__name__}: {message}"


def prepared_batches(paths: Sequence[str], transform: EvalTransform, rejected: list[dict[str, str]],
                     batch_size: int = 64, workers: int = 2, desc: str = "images"
                     ) -> Iterator[tuple[list[str], list[torch.Tensor]]]:
    """Image files in batches of ``batch_size``, decoded by ``workers`` threads
    (:func:`prepare`): (paths, uint8 CHW inputs) of the files that decoded, in input order;
    the others are appended to ``rejected``. A batch may be empty (every file rejected)."""
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(total=len(paths), desc=desc, unit="file",
                                                           disable=None) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            keys, images = [], []
            for path, (image, problem) in zip(chunk, pool.map(partial(prepare, transform=transform), chunk)):
                if problem is not None:
                    rejected.append(problem)
                else:
                    keys.append(path)
                    images.append(image)
            bar.update(len(chunk))
            yield keys, images


def _predictions(trained: TrainedModel, keys: list[str], images: torch.Tensor) -> Predictions:
    return Predictions.from_logits(keys, np.full(len(keys), -1), logits_of(trained, images))


def _describe(classes: list[dict[str, Any]], label: int, rank: int, score: float) -> dict[str, Any]:
    info = classes[label]
    return {"rank": rank, "class": int(info.get("global_index", info["index"])), "name": info["name"],
            "product_name": info.get("product_name", ""), "sku": info.get("sku", ""), "type": info.get("type", ""),
            "shape": info.get("shape", ""), "score": float(score)}


def describe_top(classes: list[dict[str, Any]], predictions: Predictions, i: int) -> list[dict[str, Any]]:
    """Row ``i`` of ``predictions`` as ranked entries ``{"rank", "class", "name",
    "product_name", "sku", "type", "shape", "score"}`` (the ``top5`` of :func:`predict_images`)."""
    return [_describe(classes, c, r + 1, s) for r, (c, s) in enumerate(zip(predictions.topk[i], predictions.scores[i]))]


def top5_of(trained: TrainedModel, images: torch.Tensor) -> list[list[dict[str, Any]]]:
    """A uint8 NCHW batch -> each image's ranked top-5 entries (:func:`describe_top`):
    :func:`predict_images`' scoring of one batch, without specialists."""
    predictions = _predictions(trained, [str(i) for i in range(len(images))], images)
    return [describe_top(trained.classes, predictions, i) for i in range(len(images))]


def _with_specialists(
    general_predictions: Predictions, routes: np.ndarray, general: TrainedModel, experts: list[TrainedModel],
    routing: list[Specialist], images: list[torch.Tensor],
) -> Predictions:
    """The ensemble's predictions: each routed image's top-k from its specialist."""
    keys = general_predictions.keys
    own = {}
    for s, expert in enumerate(experts):
        rows = np.flatnonzero(routes == s)
        if len(rows) == 0:
            continue
        if expert.spec == general.spec:
            batch = torch.stack([images[r] for r in rows])
        else:  # e.g. API-Net at another resolution: its own transform of the file
            transform = EvalTransform(expert.spec)
            batch = torch.stack([prepare(keys[r], transform)[0] for r in rows])
        own[s] = _predictions(expert, [keys[r] for r in rows], batch)
    return combine(general_predictions, own, routes, routing)


def predict_images(
    checkpoint: Checkpoint,
    paths: Sequence[str | Path],
    specialists: Sequence[Checkpoint] = (),
    rule: str = "top1",
    batch_size: int = 64,
    workers: int = 2,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Top-5 predictions of each image file (local or a URI), in input order.

    results: ``{"path", "routed_to", "top5": [{"rank", "class" (global index), "name",
    "product_name", "sku", "type", "shape", "score"}, ...]}``; rejected: ``{"path",
    "error" (unsupported | unreadable | corrupt), "reason"}``. With ``specialists``
    (checkpoints trained with ``data.meta_category``), each image is routed by ``rule``
    (:func:`rp2k_dist.evaluation.ensemble.route`) and a routed image gets its specialist's
    top-5 (:func:`~rp2k_dist.evaluation.ensemble.combine`); ``routed_to`` names that
    specialist's meta-category (None: the general model answered).
    """
    general = _load(checkpoint)
    experts = [_load(s) for s in specialists]
    routing = [specialist_of(expert) for expert in experts]
    if experts and general.class_subset is not None:
        raise CheckpointError("the general model of an ensemble must be trained on all classes (no data.meta_category)",
                              hint="pass the general model first and specialists with --specialist")
    transform = EvalTransform(general.spec)
    results: list[dict[str, Any]] = []
    rejected: list[dict[str, str]] = []
    paths = [str(p) for p in paths]
    for keys, images in prepared_batches(paths, transform, rejected, batch_size, workers, desc="predict"):
        if not keys:
            continue
        predictions = _predictions(general, keys, torch.stack(images))
        routes = np.full(len(keys), -1)
        if experts:
            routes = route(predictions.topk, general.classes, routing, rule)
            predictions = _with_specialists(predictions, routes, general, experts, routing, images)
        for i, key in enumerate(keys):
            top = describe_top(general.classes, predictions, i)
            routed = routing[routes[i]].meta_category if routes[i] >= 0 else None
            results.append({"path": storage.display(key), "routed_to": routed, "top5": top})
    return results, rejected


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS).astype(DTYPES)


def prediction_table(results: list[dict[str, Any]], rejected: list[dict[str, str]]) -> pd.DataFrame:
    """The long table (:data:`COLUMNS`): one row per image and rank, one per rejected file."""
    rows = [{"path": r["path"], "routed_to": r["routed_to"], **entry} for r in results for entry in r["top5"]]
    return _frame(rows + list(rejected))


def write_table(table: pd.DataFrame, out: str | Path) -> str:
    """Write ``table`` as Parquet, CSV or JSON (records) by ``out``'s suffix, whole, to a
    local path or a URI; returns ``out``."""
    kind = suffix(out)
    if kind == ".parquet":
        buffer = BytesIO()
        table.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    elif kind == ".csv":
        data = table.to_csv(index=False).encode("utf-8")
    else:
        records = json.loads(table.to_json(orient="records", force_ascii=False))
        data = (json.dumps(records, ensure_ascii=False, indent=1) + "\n").encode("utf-8")
    storage.write_bytes(out, data)
    return str(out)


def _check_format(out: str | Path) -> None:
    if suffix(out) not in FORMATS:
        raise ConfigError(f"--out {storage.display(out)} must end in one of {', '.join(FORMATS)}")


def list_files(folder: str | Path) -> list[str]:
    """Every file under ``folder`` (local or a URI; recursively, sorted by path parts):
    images and everything else, so that non-images are reported rather than silently
    ignored."""
    if not storage.is_dir(folder):
        raise NotFoundError(f"{storage.display(folder)} is not a folder",
                            hint="give a folder of image files (searched recursively)")
    return [storage.join(folder, name) for name in sorted(storage.walk(folder), key=lambda name: name.split("/"))]


@dataclass
class FolderPrediction:
    """What :func:`predict_folder` did: the table it wrote and the counts."""

    out: str  # where the table went (local or a URI)
    images: int  # files predicted
    rejected: list[dict[str, str]]  # files skipped, with reasons


def predict_folder(
    checkpoint: Checkpoint, folder: str | Path, out: str | Path, specialists: Sequence[Checkpoint] = (),
    rule: str = "top1", batch_size: int = 64, workers: int = 2,
) -> FolderPrediction:
    """Predict every file under ``folder`` and write :func:`prediction_table` to ``out``
    (``.parquet``, ``.csv`` or ``.json``)."""
    _check_format(out)
    results, rejected = predict_images(checkpoint, list_files(folder), specialists, rule, batch_size, workers)
    return FolderPrediction(write_table(prediction_table(results, rejected), out), len(results), rejected)


class _RayPredictor:
    """A Ray Data actor holding the models; turns a batch of paths into table rows."""

    def __init__(self, checkpoint: str, specialists: list[str], rule: str, batch_size: int):
        self.general = load_trained(checkpoint)
        self.experts = [load_trained(s) for s in specialists]
        self.rule = rule
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        results, rejected = predict_images(self.general, list(batch["path"]), self.experts, self.rule,
                                           self.batch_size, workers=1)
        return prediction_table(results, rejected)


def ray_rows(items: list[dict[str, Any]], actor: type, kwargs: dict[str, Any], batch_size: int, actors: int,
             num_gpus: float) -> list[dict[str, Any]]:
    """Ray Data batch inference: ``items`` through ``map_batches`` over ``actors`` replicas of
    ``actor(**kwargs)`` (each with ``num_gpus``; numpy batches of ``batch_size``), on the
    connected Ray cluster or a local one started here; every output row."""
    import ray

    if not items:
        return []
    dataset = ray.data.from_items(items).map_batches(
        actor, fn_constructor_kwargs=kwargs,
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=num_gpus,
    )
    return dataset.take_all()


def predict_folder_ray(
    checkpoint: str | Path, folder: str | Path, out: str | Path, specialists: Sequence[str | Path] = (),
    rule: str = "top1", batch_size: int = 64, actors: int = 2, num_gpus: float = 0.0,
) -> FolderPrediction:
    """:func:`predict_folder` as Ray Data batch inference over ``actors`` model replicas
    (each with ``num_gpus``; on the connected Ray cluster, or a local one started here).
    Same table, rows ordered by path."""
    _check_format(out)
    files = list_files(folder)
    models = {"checkpoint": str(checkpoint), "specialists": [str(s) for s in specialists], "rule": rule,
              "batch_size": batch_size}
    table = _frame(ray_rows([{"path": p} for p in files], _RayPredictor, models, batch_size, actors, num_gpus))
    table = table.sort_values(["path", "rank"], kind="stable").reset_index(drop=True)
    rejected = table.loc[table["error"].notna(), ["path", "error", "reason"]].to_dict("records")
    return FolderPrediction(write_table(table, out), table.loc[table["error"].isna(), "path"].nunique(), rejected)
