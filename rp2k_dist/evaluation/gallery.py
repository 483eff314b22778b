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
settings, threshold and how it was chosen, generation), the embedding table of
:mod:`.embeddings` and the index. Each save is a new generation: its table and index go to
files named after it (``vectors-000003.parquet``, ``index-000003.faiss``) and
``gallery.json``, written last in one write that readers never see half done, then points at
them. A save that stops before that leaves the previous generation in place, whole; the one
before the previous is deleted (a reader that has just read the previous ``gallery.json``
still finds its files). A gallery written before generations (``vectors.parquet``,
``index.faiss``) is read as generation 0. A gallery answers only queries embedded by the model
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
from ..errors import ConfigError, DataError, GalleryError, GalleryModelMismatchError
from .embeddings import (
    LABEL_COLUMNS, Embedded, read_embeddings, write_embeddings,
)
from .ood_scores import LOGIT_SCORES, knn, logit_scores

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
    generation: int = 0  # of the save it was read from (0: never saved)
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
        """Write the next generation (see the module docstring): its vectors and index, then
        ``gallery.json`` pointing at them; then delete the generation before the previous."""
        import faiss

        previous = read_manifest(location) if storage.is_file(storage.join(location, GALLERY_JSON)) else {}
        generation = max(self.generation, int(previous.get("generation", 0))) + 1
        files = generation_files(generation)
        table = self.table.copy()
        table["embedding"] = list(self.vectors)
        write_embeddings(Embedded(table, [], self.model_id), storage.join(location, files["vectors"]))
        storage.write_bytes(storage.join(location, files["index"]), faiss.serialize_index(self.index).tobytes())
        info = {**self.manifest(), "generation": generation, "files": files}
        storage.write_text(storage.join(location, GALLERY_JSON), json.dumps(info, indent=1) + "\n")
        self.generation = generation
        keep = set(files.values()) | set(previous.get("files", {}).values())
        for name in storage.listdir(location):
            if _is_generation_file(name) and name not in keep:
                storage.delete_file(storage.join(location, name))
        return str(location)

    @classmethod
    def load(cls, location: str | Path) -> "Gallery":
        import faiss

        where = storage.display(location)
        if not storage.is_file(storage.join(location, GALLERY_JSON)):
            raise GalleryError(f"{where} is not a gallery: no {GALLERY_JSON}")
        info = read_manifest(location)
        files = info.get("files", {"vectors": VECTORS, "index": INDEX})
        for name in files.values():
            if not storage.is_file(storage.join(location, name)):
                raise GalleryError(f"{where} lacks {name}: the gallery is incomplete")
        embedded = read_embeddings(storage.join(location, files["vectors"]))
        raw = storage.read_bytes(storage.join(location, files["index"]))
        index = faiss.deserialize_index(np.frombuffer(raw, np.uint8))
        vectors = np.stack(list(embedded.table["embedding"])).astype(np.float32)
        if index.ntotal != len(vectors):
            raise GalleryError(f"{where}: {files['index']} holds {index.ntotal} vectors, "
                               f"{files['vectors']} {len(vectors)}")
        settings = info["index"]
        return cls(embedded.table[list(LABEL_COLUMNS)], vectors, info["model_id"], info.get("checkpoint", ""),
                   info.get("threshold"), info.get("threshold_source", "none"), settings["kind"],
                   settings.get("nlist", 0), settings.get("nprobe", 0), index, generation=int(info.get("generation", 0)),
                   score=info.get("score", "gallery"), k=info.get("k"), score_source=info.get("score_source", "default"),
                   similarity_threshold=info.get("similarity_threshold"))


def read_manifest(location: str | Path) -> dict[str, Any]:
    """A gallery's ``gallery.json`` (checked to be this project's format)."""
    info = json.loads(storage.read_text(storage.join(location, GALLERY_JSON)))
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise GalleryError(f"{storage.display(location)}/{GALLERY_JSON} is not a version {VERSION} gallery "
                           "of this project")
    return info


def generation_of(location: str | Path) -> int:
    """The generation ``gallery.json`` names now (0: a gallery from before generations):
    one small read, for a server that reloads the gallery when it changes."""
    return int(read_manifest(location).get("generation", 0))


def generation_files(generation: int) -> dict[str, str]:
    """The file names of one generation's embedding table and index."""
    return {"vectors": f"vectors-{generation:06d}.parquet", "index": f"index-{generation:06d}.faiss"}


def _is_generation_file(name: str) -> bool:
    stem, _, kind = name.partition("-")
    return stem in ("vectors", "index") and (kind.endswith(".parquet") or kind.endswith(".faiss")) \
        and kind.split(".")[0].isdigit() or name in (VECTORS, INDEX)


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
