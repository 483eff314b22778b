"""A searchable SKU gallery: embeddings of labelled images, a FAISS index over them, and
the similarity below which a query is answered ``unknown``.

Recognition by retrieval, as retail systems do it (PaddleClas PP-ShiTu: detection, an
embedding model, and a gallery that grows by adding a few photos of a new product): a query
image's embedding (:mod:`.embeddings`, unit norm) is compared by inner product, i.e. cosine
similarity, with every gallery vector; each SKU scores its best match; the best SKU is the
answer when its score reaches the gallery's threshold, else ``unknown``. A new product needs
no retraining: ``rp2k gallery add`` embeds its photos with the same model.

Index (FAISS, Johnson et al., arXiv:1702.08734; faiss wiki "Guidelines to choose an
index"): ``flat`` is ``IndexFlatIP``, exact; ``ivf`` is ``IndexIVFFlat`` with an inner-product
coarse quantiser of ``nlist`` cells (default about 4 sqrt(N)) trained by k-means on the
vectors, searching ``nprobe`` cells (approximate: its recall against the exact search is
measured by ``bench/gallery.py``). ``auto`` is flat up to :data:`EXACT_LIMIT` vectors.

**The open-set score** (:mod:`.ood_scores`): a gallery records which score decides
"known" (``gallery``, the best similarity, by default; or the score ``rp2k openset`` chose on
validation for the run, or ``--score``), its k for ``knn`` and its threshold. ``knn``
searches the gallery's own vectors; ``msp``, ``max_logit`` and ``energy`` come from the
classifier, which can vouch only for the classes it trained on, so a query whose best SKU is
another one (added later by ``rp2k gallery add``, or a class the run never trained on) is
judged by its similarity against ``similarity_threshold`` instead, calibrated on the same
validation images. Both thresholds are chosen on validation, never on test.

A gallery is a folder (local, mounted, ``s3://``, ``gs://``; read and written whole through
:mod:`rp2k_dist.storage`): ``gallery.json`` (model id and checkpoint, dimension, count, index
settings, threshold and how it was chosen), ``vectors.parquet`` (the embedding table of
:mod:`.embeddings`) and ``index.faiss``. A gallery answers only queries embedded by the model
that built it (:class:`~rp2k_dist.errors.GalleryModelMismatchError` otherwise).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import storage
from ..data.holdout import holdout_of, train_holdout
from ..data.manifest import Manifest
from ..errors import ConfigError, DataError, GalleryError, GalleryModelMismatchError
from .embeddings import (
    LABEL_COLUMNS, Embedded, embed_samples, folder_samples, is_shards, model_id, read_embeddings, shard_samples,
    write_embeddings,
)
from .inference import TrainedModel, load_trained
from .ood_scores import LOGIT_SCORES, SCORES, calibrate_threshold, knn, logit_scores
from .predict import FolderPrediction, _check_format, list_files, write_table

GALLERY_JSON = "gallery.json"
VECTORS = "vectors.parquet"
INDEX = "index.faiss"
FORMAT = "rp2k-dist-gallery"
VERSION = 1
#: ``auto`` index: exact (flat) search up to this many vectors, IVF beyond.
EXACT_LIMIT = 1_000_000
INDEX_KINDS = ("auto", "flat", "ivf")
#: The answer of a query whose best SKU scores below the threshold.
UNKNOWN = "unknown"
#: Default share of known queries accepted by a calibrated threshold.
DEFAULT_TAR = 0.95


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about 4 sqrt(n) (faiss wiki), and at most n / 39 so
    that k-means has its 39 training points per centroid; at least 1."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build_index(vectors: np.ndarray, kind: str = "auto", nlist: int = 0, nprobe: int = 0):
    """A FAISS inner-product index over ``vectors`` [N, D] (float32, unit norm): (index,
    resolved kind, nlist, nprobe). ``nlist`` 0: :func:`default_nlist`; ``nprobe`` 0: 8 (at
    most nlist)."""
    import faiss

    if kind not in INDEX_KINDS:
        raise ConfigError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    vectors = np.ascontiguousarray(vectors, np.float32)
    n, dim = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= EXACT_LIMIT else "ivf"
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, kind, 0, 0
    nlist = nlist or default_nlist(n)
    if n < nlist:
        raise ConfigError(f"an IVF index of {nlist} cells needs at least {nlist} vectors, the gallery has {n}",
                          hint="use --index flat (exact) for small galleries, or a smaller --nlist")
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors)
    index.add(vectors)
    index.nprobe = min(nprobe or 8, nlist)
    return index, kind, nlist, int(index.nprobe)


@dataclass
class Match:
    """One SKU of a query's ranking: its label columns and best similarity."""

    label: dict[str, Any]
    score: float


@dataclass
class Gallery:
    """Labelled unit-norm vectors with their index and threshold (see the module docstring)."""

    table: pd.DataFrame  # LABEL_COLUMNS, one row per vector
    vectors: np.ndarray  # float32 [N, D], unit norm
    model_id: str
    checkpoint: str = ""  # where the model was loaded from (for `rp2k gallery add`)
    threshold: float | None = None  # None: every query gets its best SKU
    threshold_source: str = "none"
    index_kind: str = "flat"
    nlist: int = 0
    nprobe: int = 0
    index: Any = field(default=None, repr=False)
    score: str = "gallery"  # the open-set score the threshold applies to (:mod:`.ood_scores`)
    k: int | None = None  # its k (knn)
    score_source: str = "default"  # why this score
    similarity_threshold: float | None = None  # for SKUs the classifier cannot score (logit scores)

    @classmethod
    def create(cls, embedded: Embedded, checkpoint: str = "", index: str = "auto", nlist: int = 0,
               nprobe: int = 0) -> "Gallery":
        """A gallery of an embedding table, with its index built."""
        if embedded.table.empty:
            raise DataError("no image to put into the gallery")
        vectors = np.stack(list(embedded.table["embedding"])).astype(np.float32)
        built, kind, nlist, nprobe = build_index(vectors, index, nlist, nprobe)
        return cls(embedded.table[list(LABEL_COLUMNS)].reset_index(drop=True), vectors, embedded.model_id,
                   checkpoint, index_kind=kind, nlist=nlist, nprobe=nprobe, index=built)

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def skus(self) -> np.ndarray:
        return self.table["sku"].astype(str).to_numpy()

    def check_model(self, other_id: str, what: str = "this model") -> None:
        """Raise :class:`GalleryModelMismatchError` unless ``other_id`` is the gallery's model."""
        if other_id != self.model_id:
            raise GalleryModelMismatchError(
                f"the gallery holds embeddings of model {self.model_id} ({storage.display(self.checkpoint) or '?'}), "
                f"{what} is {other_id}: its embeddings are not comparable")

    def add(self, embedded: Embedded) -> None:
        """Append labelled vectors (same model); the index takes them without retraining."""
        self.check_model(embedded.model_id, "the model of the added images")
        vectors = np.stack(list(embedded.table["embedding"])).astype(np.float32)
        self.index.add(np.ascontiguousarray(vectors))
        self.vectors = np.concatenate([self.vectors, vectors])
        self.table = pd.concat([self.table, embedded.table[list(LABEL_COLUMNS)]], ignore_index=True)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar gallery vectors of each query [M, D]: (similarities [M, k],
        rows [M, k]; -1 where fewer were found)."""
        k = max(1, min(k, len(self)))
        return self.index.search(np.ascontiguousarray(queries, np.float32), k)

    def rank(self, queries: np.ndarray, k: int = 5, neighbours: int = 0) -> list[list[Match]]:
        """Each query's best ``k`` SKUs, a SKU scoring its most similar gallery vector among
        the ``neighbours`` nearest (default: 10 k, at least 64)."""
        scores, rows = self.search(queries, neighbours or max(64, 10 * k))
        skus = self.skus
        ranked = []
        for score_row, index_row in zip(scores, rows):
            best: dict[str, tuple[float, int]] = {}
            for score, row in zip(score_row, index_row):
                if row >= 0 and skus[row] not in best:  # results come best first
                    best[skus[row]] = (float(score), int(row))
            top = sorted(best.values(), key=lambda item: -item[0])[:k]
            ranked.append([Match(self.label(row), score) for score, row in top])
        return ranked

    def label(self, row: int) -> dict[str, Any]:
        info = self.table.iloc[row]
        return {"class": int(info["class"]), "name": str(info["name"]), "sku": str(info["sku"]),
                "type": str(info["type"]), "shape": str(info["shape"])}

    def answer(self, matches: list[Match], known: float | None = None, trained: set[int] | None = None) -> str:
        """The best SKU, or :data:`UNKNOWN` when the query scores below the threshold.

        ``known``: the query's open-set score (:meth:`known_scores`; None: the best match's
        similarity, the ``gallery`` score). With a classifier score and ``trained`` (the
        classes the model trained on), a best SKU outside ``trained`` is judged by its
        similarity against :attr:`similarity_threshold`."""
        if not matches:
            return UNKNOWN
        best = matches[0]
        if self.score in LOGIT_SCORES and trained is not None and best.label["class"] not in trained:
            limit, value = self.similarity_threshold, best.score
        else:
            limit, value = self.threshold, best.score if known is None or self.score == "gallery" else known
        return UNKNOWN if limit is not None and value < limit else best.label["sku"]

    def known_scores(self, vectors: np.ndarray, logits: np.ndarray | None, ranked: list[list[Match]]) -> np.ndarray:
        """The gallery's open-set score of each query (unit-norm ``vectors`` [M, D], the trained
        classes' ``logits`` [M, C] for a classifier score): higher = more known."""
        if self.score == "gallery":
            return np.array([m[0].score if m else -np.inf for m in ranked], np.float64)
        if self.score == "knn":
            return knn(vectors, self.vectors, min(self.k or 10, len(self)))
        if logits is None:
            raise ConfigError(f"the gallery's score {self.score} needs the classifier's logits")
        return logit_scores(logits)[self.score]

    # -- persistence --------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model_id": self.model_id, "checkpoint": self.checkpoint,
                "dim": int(self.vectors.shape[1]), "vectors": len(self), "skus": int(len(set(self.skus))),
                "index": {"kind": self.index_kind, "nlist": self.nlist, "nprobe": self.nprobe},
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "score": self.score, "k": self.k, "score_source": self.score_source,
                "similarity_threshold": self.similarity_threshold}

    def save(self, location: str | Path) -> str:
        """Write the folder: vectors, index, then ``gallery.json`` (which marks it complete)."""
        import faiss

        table = self.table.copy()
        table["embedding"] = list(self.vectors)
        write_embeddings(Embedded(table, [], self.model_id), storage.join(location, VECTORS))
        storage.write_bytes(storage.join(location, INDEX), faiss.serialize_index(self.index).tobytes())
        storage.write_text(storage.join(location, GALLERY_JSON), json.dumps(self.manifest(), indent=1) + "\n")
        return str(location)

    @classmethod
    def load(cls, location: str | Path) -> "Gallery":
        import faiss

        where = storage.display(location)
        if not storage.is_file(storage.join(location, GALLERY_JSON)):
            raise GalleryError(f"{where} is not a gallery: no {GALLERY_JSON}")
        info = json.loads(storage.read_text(storage.join(location, GALLERY_JSON)))
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise GalleryError(f"{where}/{GALLERY_JSON} is not a version {VERSION} gallery of this project")
        for name in (VECTORS, INDEX):
            if not storage.is_file(storage.join(location, name)):
                raise GalleryError(f"{where} lacks {name}: the gallery is incomplete")
        embedded = read_embeddings(storage.join(location, VECTORS))
        index = faiss.deserialize_index(np.frombuffer(storage.read_bytes(storage.join(location, INDEX)), np.uint8))
        vectors = np.stack(list(embedded.table["embedding"])).astype(np.float32)
        if index.ntotal != len(vectors):
            raise GalleryError(f"{where}: {INDEX} holds {index.ntotal} vectors, {VECTORS} {len(vectors)}")
        settings = info["index"]
        return cls(embedded.table[list(LABEL_COLUMNS)], vectors, info["model_id"], info.get("checkpoint", ""),
                   info.get("threshold"), info.get("threshold_source", "none"), settings["kind"],
                   settings.get("nlist", 0), settings.get("nprobe", 0), index, info.get("score", "gallery"),
                   info.get("k"), info.get("score_source", "default"), info.get("similarity_threshold"))


# -- building from a checkpoint --------------------------------------------------------------------
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


def recall_against_exact(vectors: np.ndarray, queries: np.ndarray, k: int, nlist: int = 0,
                         nprobes: Sequence[int] = (1, 8)) -> dict[int, float]:
    """Recall@``k`` of IVF searches (each ``nprobe``) against the exact search: the share of
    the exact ``k`` nearest vectors that the IVF search also returns."""
    exact, _, _, _ = build_index(vectors, "flat")
    _, truth = exact.search(queries, k)
    ivf, _, nlist, _ = build_index(vectors, "ivf", nlist)
    out = {}
    for nprobe in nprobes:
        ivf.nprobe = min(nprobe, nlist)
        _, found = ivf.search(queries, k)
        out[nprobe] = float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))
    return out
