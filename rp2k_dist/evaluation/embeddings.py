"""Embeddings of a trained model: the L2-normalised pooled penultimate feature (with a
cosine head, exactly the vector its logits compare with each class's weights).

:func:`shard_features` is the one feature loop over shard images: ``rp2k umap`` (raw
features, Fig. 3), ``rp2k embed``, galleries and the open-set evaluation all call it, so
every consumer sees the same decode, evaluation transform and model call
(:func:`rp2k_dist.evaluation.inference.features_of`). Image files go through
:func:`image_features`, which uses ``rp2k predict``'s :func:`~.predict.prepare` (same
preprocessing, same rejection of unreadable files).

An embedding table (Parquet) has one row per image: ``key`` (a shard sample's key, or a
file's path), ``split`` (shards; '' for files), ``class`` (global class index; -1 for a label the model
does not know), ``name``, ``sku``, ``type``, ``shape`` and ``embedding`` (float32 [D],
unit norm); its schema metadata holds the model's id (:func:`model_id`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import storage
from ..data.manifest import DATASET_JSON, Manifest
from ..data.tar_index import iter_shard_images
from ..data.transforms import EvalTransform
from ..errors import DataError
from .inference import TrainedModel, features_of, load_trained
from .predict import list_files, prepared_batches, ray_rows

#: Columns of an embedding table besides ``embedding``.
LABEL_COLUMNS = ("key", "split", "class", "name", "sku", "type", "shape")
#: Parquet schema metadata key holding the model id.
MODEL_ID_KEY = b"rp2k.model_id"


def model_id(trained: TrainedModel) -> str:
    """``sha256:<16 hex>`` of the model's weights (every state-dict tensor's name, dtype,
    shape and bytes, in order): two checkpoints embed alike exactly when their ids match."""
    digest = hashlib.sha256()
    for name, tensor in trained.checkpoint["model"].items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()[:16]}"


@torch.no_grad()
def embeddings_of(trained: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> unit-norm embeddings [N, D] (float32, CPU)."""
    return F.normalize(features_of(trained, images), dim=1)


@torch.no_grad()
def logits_of_features(trained: TrainedModel, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Raw pooled features [N, D] (``normalise=False``) -> the logits [N, C'] of the classes
    the model trained on (a run's unseen classes, ``data.holdout_classes``, keep an output
    that was never a target: left out), float64, by the model's own classifier."""
    columns = seen_columns(trained)
    parts = []
    for start in range(0, len(features), batch_size):
        chunk = torch.as_tensor(np.asarray(features[start:start + batch_size], np.float32), device=trained.device)
        parts.append(trained.model.classifier(chunk).float().cpu().numpy()[:, columns])
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros((0, len(columns)))


def seen_columns(trained: TrainedModel) -> list[int]:
    """Logit columns of the classes the model trained on (not ``unseen``)."""
    return [int(c["index"]) for c in trained.classes if not c.get("unseen")]


def shard_features(
    trained: TrainedModel, shards: str | Path | Manifest, keys: Sequence[str], batch_size: int = 64, workers: int = 2,
    normalise: bool = True, progress: bool = True,
) -> dict[str, np.ndarray]:
    """Features [D] (float32) of each key's shard image (evaluation transform), by key;
    unit norm with ``normalise``, else the raw pooled features (UMAP)."""
    transform = EvalTransform(trained.spec)
    embed = embeddings_of if normalise else features_of
    features: dict[str, np.ndarray] = {}
    stream = iter_shard_images(shards, keys)
    with ThreadPoolExecutor(max(1, workers)) as pool, tqdm(
        total=len(keys), desc="features", unit="img", disable=None if progress else True
    ) as bar:
        while batch := list(islice(stream, batch_size)):
            images = torch.stack(list(pool.map(transform, [jpeg for _, jpeg in batch])))
            features.update(zip([key for key, _ in batch], embed(trained, images).numpy()))
            bar.update(len(batch))
    return features


def image_features(
    trained: TrainedModel, paths: Sequence[str | Path], batch_size: int = 64, workers: int = 2,
    normalise: bool = True,
) -> tuple[list[str], np.ndarray, list[dict[str, str]]]:
    """Unit-norm embeddings of image files (local or URIs): (paths embedded, [N, D] float32,
    rejected files as ``{"path", "error", "reason"}``, see :func:`~.predict.prepare`); the
    raw pooled features without ``normalise``."""
    transform = EvalTransform(trained.spec)
    kept: list[str] = []
    parts: list[np.ndarray] = []
    rejected: list[dict[str, str]] = []
    paths = [str(p) for p in paths]
    for keys, images in prepared_batches(paths, transform, rejected, batch_size, workers, desc="embed"):
        if images:
            kept.extend(keys)
            parts.append((embeddings_of if normalise else features_of)(trained, torch.stack(images)).numpy())
    dim = parts[0].shape[1] if parts else 0
    return kept, (np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)), rejected


def is_shards(source: str | Path) -> bool:
    """Whether ``source`` is a packed dataset (holds ``dataset.json``)."""
    return storage.is_file(storage.join(source, DATASET_JSON))


def label_of(classes: Sequence[dict[str, Any]], label: str) -> dict[str, Any]:
    """Label columns of a label given by name (a class folder name or a SKU): the matching
    class of ``classes`` (a model's or a manifest's table), else class -1 with ``label`` as
    its name and SKU."""
    for c in classes:
        if label in (c.get("name"), c.get("sku")) and label:
            return class_columns(c)
    return {"class": -1, "name": label, "sku": label, "type": "unknown", "shape": "unknown"}


def class_columns(info: dict[str, Any]) -> dict[str, Any]:
    """A class table entry as the label columns (``class`` = its global index)."""
    return {"class": int(info.get("global_index", info["index"])), "name": info["name"],
            "sku": info.get("sku") or info["name"], "type": info.get("type", "unknown"),
            "shape": info.get("shape", "unknown")}


def shard_samples(manifest: Manifest, split: str, classes: Sequence[int] | None = None) -> pd.DataFrame:
    """Samples of ``split`` (of ``classes`` only, if given), sorted by key, with their label
    columns (:data:`LABEL_COLUMNS`)."""
    index = manifest.index().select(["key", "split", "label"]).to_pandas()
    rows = index[index["split"] == split]
    if classes is not None:
        rows = rows[rows["label"].isin(list(classes))]
    rows = rows.sort_values("key").reset_index(drop=True)
    info = pd.DataFrame([class_columns(c) for c in manifest.classes])
    return rows.merge(info, left_on="label", right_on="class", how="left").drop(columns="label")[list(LABEL_COLUMNS)]


def folder_samples(folder: str | Path, classes: Sequence[dict[str, Any]], label: str | None = None) -> pd.DataFrame:
    """Every file under ``folder`` with label columns: ``label`` for all when given, else
    each file's first sub-folder name (``folder/<label>/...``; '' for files at the top),
    matched to ``classes`` by name or SKU (:func:`label_of`)."""
    rows = []
    base = storage.join(folder, "").rstrip("/")
    for path in list_files(folder):
        relative = path[len(base):].lstrip("/")
        name = label if label is not None else (relative.split("/")[0] if "/" in relative else "")
        rows.append({"key": path, "split": "", **label_of(classes, name)})
    return pd.DataFrame(rows, columns=list(LABEL_COLUMNS))


@dataclass
class Embedded:
    """An embedding table and what could not be embedded."""

    table: pd.DataFrame  # LABEL_COLUMNS + embedding
    rejected: list[dict[str, str]]
    model_id: str


def embed_samples(trained: TrainedModel, samples: pd.DataFrame, shards: str | Path | Manifest | None,
                  batch_size: int = 64, workers: int = 2, progress: bool = True) -> Embedded:
    """Embed the rows of ``samples`` (shard keys when ``shards`` is given, else file
    paths); rejected files are dropped from the table."""
    samples = samples.reset_index(drop=True)
    if shards is not None:
        found = shard_features(trained, shards, samples["key"].tolist(), batch_size, workers, progress=progress)
        vectors, rejected = [found[k] for k in samples["key"]], []
    else:
        kept, matrix, rejected = image_features(trained, samples["key"].tolist(), batch_size, workers)
        samples = samples.set_index("key").loc[kept].reset_index()
        vectors = list(matrix)
    table = samples.copy()
    table["embedding"] = vectors
    return Embedded(table, rejected, model_id(trained))


def embed_source(
    checkpoint: str | Path | TrainedModel, source: str | Path, split: str = "test", batch_size: int = 64,
    workers: int = 2, label: str | None = None,
) -> Embedded:
    """Embed every image of ``source``: a packed dataset (its ``split``) or a folder of
    image files (labels from sub-folder names, or ``label`` for all)."""
    trained = checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint)
    if is_shards(source):
        manifest = Manifest.load(source)
        samples = shard_samples(manifest, split)
        if samples.empty:
            raise DataError(f"{storage.display(source)} has no {split!r} samples")
        return embed_samples(trained, samples, manifest, batch_size, workers)
    return embed_samples(trained, folder_samples(source, trained.classes, label), None, batch_size, workers)


class _RayEmbedder:
    """A Ray Data actor holding the model: a batch of keys (shard samples or files) -> rows
    of ``key``, ``embedding`` (empty for a rejected file) and ``reason`` ('' when embedded)."""

    def __init__(self, checkpoint: str, shards: str | None, batch_size: int):
        self.trained = load_trained(checkpoint)
        self.manifest = Manifest.load(shards) if shards else None
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pd.DataFrame:
        keys = [str(k) for k in batch["key"]]
        samples = pd.DataFrame({"key": keys})
        done = embed_samples(self.trained, samples, self.manifest, self.batch_size, workers=1, progress=False)
        found = dict(zip(done.table["key"], done.table["embedding"]))
        reasons = {r["path"]: r["reason"] for r in done.rejected}
        return pd.DataFrame({"key": keys, "embedding": [found.get(k, np.zeros(0, np.float32)) for k in keys],
                             "reason": [reasons.get(storage.display(k), "") for k in keys]})


def embed_source_ray(
    checkpoint: str | Path, source: str | Path, split: str = "test", batch_size: int = 64, actors: int = 2,
    num_gpus: float = 0.0, label: str | None = None,
) -> Embedded:
    """:func:`embed_source` as Ray Data batch inference over ``actors`` model replicas (the
    same ``map_batches`` set-up as ``rp2k predict --ray``, :func:`~.predict.ray_rows`).
    Shard samples are dealt in shard order so each batch reads few shards."""
    trained = load_trained(checkpoint, device="cpu")  # the labels and the id; the actors embed
    shards = is_shards(source)
    if shards:
        manifest = Manifest.load(source)
        samples = shard_samples(manifest, split)
        position = manifest.index().select(["key", "shard", "offset"]).to_pandas()
        order = samples.merge(position, on="key").sort_values(["shard", "offset"])["key"].tolist()
    else:
        samples = folder_samples(source, trained.classes, label)
        order = samples["key"].tolist()
    rows = ray_rows([{"key": k} for k in order], _RayEmbedder,
                    {"checkpoint": str(checkpoint), "shards": str(source) if shards else None, "batch_size": batch_size},
                    batch_size, actors, num_gpus)
    found = {str(r["key"]): np.asarray(r["embedding"], np.float32) for r in rows if not r["reason"]}
    rejected = [{"path": storage.display(r["key"]), "error": "rejected", "reason": str(r["reason"])}
                for r in rows if r["reason"]]
    table = samples[samples["key"].isin(found)].reset_index(drop=True)
    table["embedding"] = [found[k] for k in table["key"]]
    return Embedded(table, rejected, model_id(trained))


def write_embeddings(embedded: Embedded, out: str | Path) -> str:
    """The table as Parquet (``embedding`` a list<float32> column, the model id in the schema
    metadata), written whole to ``out`` (local or a URI)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    frame = embedded.table
    columns = {c: frame[c].tolist() for c in LABEL_COLUMNS}
    columns["class"] = [int(c) for c in columns["class"]]
    table = pa.table({**columns, "embedding": pa.array([np.asarray(v, np.float32) for v in frame["embedding"]],
                                                        pa.list_(pa.float32()))})
    table = table.replace_schema_metadata({MODEL_ID_KEY: embedded.model_id.encode()})
    buffer = BytesIO()
    pq.write_table(table, buffer)
    storage.write_bytes(out, buffer.getvalue())
    return str(out)


def read_embeddings(location: str | Path) -> Embedded:
    """An embedding table written by :func:`write_embeddings`."""
    import pyarrow.parquet as pq

    table = pq.read_table(BytesIO(storage.read_bytes(location)))
    frame = table.drop(["embedding"]).to_pandas()
    frame["embedding"] = list(np.asarray(table.column("embedding").to_pylist(), np.float32))
    metadata = table.schema.metadata or {}
    return Embedded(frame, [], metadata.get(MODEL_ID_KEY, b"").decode())
