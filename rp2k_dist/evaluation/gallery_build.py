"""Galleries from a trained run: ``rp2k gallery build``, ``rp2k gallery add`` and
``rp2k predict --gallery``.

:func:`build_gallery` embeds a few train images per class (``shots``) with a run's model,
calibrates the threshold on the run's validation split (``data.holdout``) for the open-set
score the run chose (``rp2k openset``) or ``--score``, and saves a :class:`~.gallery.Gallery`;
:func:`add_to_gallery` appends a new product's photos; :func:`predict_with_gallery` answers a
folder of photos with SKUs or ``unknown``. The gallery itself (index, search, folder format,
generations) is :mod:`.gallery`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import storage
from ..data.holdout import holdout_of, train_holdout
from ..data.manifest import Manifest
from ..errors import ConfigError, DataError
from .embeddings import (
    embed_samples, folder_samples, is_shards, model_id, shard_samples,
)
from .gallery import DEFAULT_TAR, UNKNOWN, Gallery, Match
from .inference import TrainedModel, load_trained
from .ood_scores import LOGIT_SCORES, SCORES, calibrate_threshold
from .predict import FolderPrediction, _check_format, list_files, write_table


def shots(samples: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """At most ``per_class`` rows of each label (``sku``), the first by a hash of the key:
    the same images whatever the order of ``samples`` (0 = all rows)."""
    if not per_class:
        return samples
    import hashlib

    rank = samples["key"].map(lambda k: hashlib.blake2b(str(k).encode(), digest_size=8).hexdigest())
    ordered = samples.assign(_rank=rank).sort_values(["sku", "_rank", "key"])
    return ordered.groupby("sku", sort=False).head(per_class).drop(columns="_rank").sort_values("key").reset_index(drop=True)


def validation_keys(manifest: Manifest, fraction: float, by: str = "groups") -> set[str]:
    """Keys of the train images held out as the validation split (``data.holdout``,
    drawn ``by`` groups of near-duplicates or single keys: :mod:`rp2k_dist.data.holdout`)."""
    index = manifest.index()
    rows = index.select(["key", "split", "label"] + (["phash"] if "phash" in index.column_names else [])).to_pydict()
    train = [key for key, split in zip(rows["key"], rows["split"]) if split == "train"]
    return {key for key, held in zip(train, train_holdout(rows, fraction, by)) if held}


@dataclass
class Built:
    """What :func:`build_gallery` did."""

    gallery: Gallery
    location: str
    rejected: list[dict[str, str]]
    calibration_queries: int  # validation images the threshold was chosen on (0: given or none)


def run_score(checkpoint: str | Path) -> tuple[str, int | None, str] | None:
    """(score, k, why) chosen on validation by ``rp2k openset`` for the run of ``checkpoint``
    (its ``openset.json``), or None when it has none."""
    from .. import run_folder
    from ..run_folder import find_run_dir, read_json
    from ..storage import RunStorage

    try:
        data = read_json(RunStorage.at(find_run_dir(checkpoint)), run_folder.OPENSET)
    except Exception:  # noqa: BLE001 - a checkpoint outside a run folder has no open-set choice
        return None
    if not data or not data.get("scores"):
        return None
    return data["chosen"], data.get("chosen_k"), f"chosen on validation by rp2k openset ({data.get('chosen_reason', '')})"


def resolve_score(checkpoint: str | Path, score: str | None) -> tuple[str, int | None, str]:
    """The gallery's score: ``score`` (``--score``), else the run's open-set choice, else
    ``gallery``; k for ``knn`` from the run's open-set table, else 10."""
    chosen = run_score(checkpoint)
    if score is None:
        return chosen or ("gallery", None, "default (the run has no open-set choice: rp2k openset)")
    if score not in SCORES:
        raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    k = None
    if score == "knn":
        k = chosen[1] if chosen and chosen[0] == "knn" else 10
    return score, k, "given (--score)"


def query_scores(trained: TrainedModel, gallery: Gallery, raw: np.ndarray, k: int = 5
                 ) -> tuple[list[list[Match]], np.ndarray, np.ndarray]:
    """(ranked SKUs, similarity of the best SKU, the gallery's open-set score) of queries'
    raw pooled features [M, D]."""
    from .embeddings import logits_of_features

    vectors = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    ranked = gallery.rank(vectors.astype(np.float32), k) if len(vectors) else []
    logits = logits_of_features(trained, raw) if gallery.score in LOGIT_SCORES else None
    similarity = np.array([m[0].score if m else -np.inf for m in ranked], np.float64)
    return ranked, similarity, gallery.known_scores(vectors, logits, ranked) if len(vectors) else similarity


def trained_classes(trained: TrainedModel) -> set[int]:
    """Global indices of the classes the model trained on (not a run's unseen classes)."""
    return {int(c["global_index"]) for c in trained.classes if not c.get("unseen")}


def build_gallery(
    checkpoint: str | Path, source: str | Path, out: str | Path, split: str = "train", per_class: int = 0,
    index: str = "auto", nlist: int = 0, nprobe: int = 0, threshold: float | None = None,
    tar: float = DEFAULT_TAR, batch_size: int = 64, workers: int = 2, score: str | None = None,
) -> Built:
    """Embed ``source`` (a packed dataset's ``split``, or a folder of ``<sku>/<image>``)
    into a gallery at ``out``, ``per_class`` images per SKU (0 = all).

    Score (:func:`resolve_score`): ``score``, else the one ``rp2k openset`` chose on
    validation for the run, else ``gallery``. Threshold: ``threshold`` when given; else, for
    a packed dataset whose checkpoint was trained with ``data.holdout`` > 0, calibrated to
    accept ``tar`` of that validation split (images of the classes the model trained on,
    never in the gallery), scored against this gallery; else none (every query gets its
    best SKU). A classifier score also gets a similarity threshold, calibrated alike, for
    the SKUs the classifier does not know."""
    trained = load_trained(checkpoint)
    name, k, why = resolve_score(checkpoint, score)
    validation: set[str] = set()
    manifest = None
    if is_shards(source):
        manifest = Manifest.load(source)
        samples = shard_samples(manifest, split)
        fraction, by = holdout_of(trained.checkpoint["config"]["data"])
        if split == "train" and fraction > 0:
            validation = validation_keys(manifest, fraction, by)
            samples = samples[~samples["key"].isin(validation)]
    else:
        samples = folder_samples(source, trained.classes)
    samples = shots(samples, per_class)
    embedded = embed_samples(trained, samples, manifest, batch_size, workers)
    gallery = Gallery.create(embedded, storage.absolute(str(checkpoint)), index, nlist, nprobe)
    gallery.score, gallery.k, gallery.score_source = name, (min(k, len(gallery)) if k else k), why
    queries = 0
    if threshold is not None:
        gallery.threshold, gallery.threshold_source = float(threshold), "given (--threshold)"
    if validation and (threshold is None or name in LOGIT_SCORES):
        from .embeddings import shard_features

        seen = trained_classes(trained)
        frame = shard_samples(manifest, "train")
        frame = frame[frame["key"].isin(validation) & frame["class"].isin(seen)]
        found = shard_features(trained, manifest, frame["key"].tolist(), batch_size, workers, normalise=False)
        raw = np.stack([found[key] for key in frame["key"]]).astype(np.float32)
        _, similarity, known = query_scores(trained, gallery, raw)
        where = (f"{len(raw)} validation images (data.holdout "
                 f"{trained.checkpoint['config']['data']['holdout']})")
        if threshold is None:
            gallery.threshold = calibrate_threshold(known, tar)
            gallery.threshold_source = f"calibrated: {gallery.score} accepting {tar:.0%} of {where}"
        if name in LOGIT_SCORES:
            gallery.similarity_threshold = calibrate_threshold(similarity, tar)
        queries = len(raw)
    gallery.save(out)
    return Built(gallery, str(out), embedded.rejected, queries)


def add_to_gallery(
    location: str | Path, images: str | Path, label: str, checkpoint: str | Path | None = None,
    batch_size: int = 64, workers: int = 2,
) -> tuple[Gallery, int, list[dict[str, str]]]:
    """Embed every image under ``images`` as SKU ``label`` with the gallery's model (its
    recorded checkpoint, or ``checkpoint``, which must have the same weights) and save the
    gallery; returns (gallery, images added, rejected files)."""
    gallery = Gallery.load(location)
    trained = load_trained(checkpoint or gallery.checkpoint)
    gallery.check_model(model_id(trained), f"checkpoint {storage.display(checkpoint or gallery.checkpoint)}")
    embedded = embed_samples(trained, folder_samples(images, trained.classes, label), None, batch_size, workers)
    if embedded.table.empty:
        raise DataError(f"no image under {storage.display(images)} could be embedded",
                        hint="give a folder holding .jpg / .png photos of the product")
    gallery.add(embedded)
    gallery.save(location)
    return gallery, len(embedded.table), embedded.rejected


#: Columns of ``rp2k predict --gallery``: one row per (image, rank) of the top SKUs, with the
#: image's answer (a SKU or ``unknown``) and the threshold it was compared with.
@dataclass
class GalleryPrediction(FolderPrediction):
    """:class:`~.predict.FolderPrediction` plus the images answered ``unknown``."""

    unknown: int = 0


GALLERY_DTYPES = {"path": "string", "answer": "string", "rank": "Int64", "class": "Int64", "name": "string",
                  "sku": "string", "type": "string", "shape": "string", "score": "float64",
                  "threshold": "float64", "open_set_score": "float64", "error": "string", "reason": "string"}


def predict_with_gallery(
    checkpoint: str | Path | TrainedModel, folder: str | Path, gallery: str | Path | Gallery, out: str | Path,
    k: int = 5, batch_size: int = 64, workers: int = 2,
) -> GalleryPrediction:
    """Answer every image under ``folder`` with a SKU of the gallery or ``unknown`` and write
    the table (:data:`GALLERY_DTYPES`) to ``out`` (``.parquet``, ``.csv`` or ``.json``)."""
    from .embeddings import image_features

    _check_format(out)
    trained = checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint)
    gallery = gallery if isinstance(gallery, Gallery) else Gallery.load(gallery)
    gallery.check_model(model_id(trained), "the checkpoint given to predict")
    paths, raw, rejected = image_features(trained, list_files(folder), batch_size, workers, normalise=False)
    rows: list[dict[str, Any]] = []
    ranked, _, known = query_scores(trained, gallery, raw, k) if len(paths) else ([], None, [])
    trained_set = trained_classes(trained)
    unknown = 0
    for path, matches, value in zip(paths, ranked, known):
        answer = gallery.answer(matches, float(value), trained_set)
        unknown += answer == UNKNOWN
        for rank, match in enumerate(matches, 1):
            rows.append({"path": storage.display(path), "answer": answer, "rank": rank, **match.label,
                         "score": match.score, "threshold": gallery.threshold, "open_set_score": float(value)})
    table = pd.DataFrame(rows + list(rejected), columns=list(GALLERY_DTYPES)).astype(GALLERY_DTYPES)
    return GalleryPrediction(write_table(table, out), len(paths), rejected, unknown)


def answers(table: pd.DataFrame) -> dict[str, str]:
    """path -> answer of a :func:`predict_with_gallery` table."""
    first = table[table["rank"] == 1]
    return dict(zip(first["path"], first["answer"]))
