"""Open-set evaluation of a run trained with unseen classes (``data.holdout_classes``):
how well its embeddings recognise products it never trained on, and reject them when the
gallery does not hold them.

Everything is computed on unit-norm embeddings (:func:`~.embeddings.shard_features`, one
pass over the images involved), per ``type`` meta-category and over all:

* **closed set**: top-1 / top-5 of the classifier on the seen classes' test images (the
  run's own Table 2, ``evaluation.json``: unseen classes are out of its test loader).
* **recall@1 / recall@5, 1-shot and 5-shot**: each unseen class's gallery is its first 1 or
  5 train images by a hash of the key (never trained on); queries are the unseen classes'
  test images; the unseen classes are ranked by their best gallery match (cosine
  similarity) and a query counts when its class is among the first k (Musgrave et al.,
  "A Metric Learning Reality Check", ECCV 2020, for recall@k as a retrieval measure).
* **AUROC**: seen test images (known) against unseen test images (unknown), scored by
  their best cosine similarity to a gallery of the seen classes (``seen_shots`` train images
  per class, outside the validation split); 1 = every known query scores above every
  unknown one, 0.5 = chance.
* **FAR at TAR 95 %**: the threshold accepts 95 % of the validation split (``data.holdout``:
  seen classes' train images held out of training, so queries the model has not fitted)
  and the false-accept rate is the share of unseen test images scoring at or above it;
  the test TAR at that threshold is shown beside it.

Every figure carries its 95 % bootstrap interval (:mod:`~.stats`: recall and TAR resampled
within each class, AUROC within the known and the unknown images). Written to the run
folder (or ``out``) as ``openset.json`` (strict JSON: an undefined figure is ``null``) and
``openset.md``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import run_folder
from ..data.holdout import holdout_of
from ..data.manifest import Manifest
from ..data.metadata import TYPES
from ..errors import DataError
from ..run_folder import find_run_dir, read_json, write_json
from ..storage import RunStorage
from .embeddings import shard_features, shard_samples
from .gallery import DEFAULT_TAR, calibrate_threshold, shots, validation_keys
from .inference import TrainedModel, load_trained
from .metrics import format_percent
from .stats import Interval, auroc, auroc_interval, proportion_interval

SHOTS = (1, 5)
KS = (1, 5)
ALL = "all"


def class_scores(queries: np.ndarray, gallery: np.ndarray, gallery_classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's best cosine similarity to each class of the gallery: (classes [C],
    scores [M, C]); vectors are unit norm, so the inner product is the cosine."""
    classes = np.unique(gallery_classes)
    sims = queries @ gallery.T
    scores = np.full((len(queries), len(classes)), -np.inf, np.float32)
    for j, c in enumerate(classes):
        scores[:, j] = sims[:, gallery_classes == c].max(axis=1)
    return classes, scores


def recall_at(queries: np.ndarray, labels: np.ndarray, gallery: np.ndarray, gallery_classes: np.ndarray,
              k: int) -> np.ndarray:
    """bool [M]: each query's class is among the ``k`` gallery classes with the best match."""
    classes, scores = class_scores(queries, gallery, gallery_classes)
    top = classes[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
    return (top == labels[:, None]).any(axis=1)


@dataclass
class OpenSetRow:
    """One meta-category (or ``all``): percentages 0..100 (AUROC 0..1); nan = not measurable."""

    group: str
    seen_classes: int
    unseen_classes: int
    seen_test: int
    unseen_test: int
    top1: float
    top5: float
    recall: dict[str, float]  # "r@1 1-shot", "r@5 1-shot", "r@1 5-shot", "r@5 5-shot"
    auroc: float
    far: float  # unseen test images accepted at the threshold
    tar: float  # seen test images accepted at the threshold
    #: 95 % bounds [low, high] of each recall name, "auroc", "far" and "tar" (None = undefined;
    #: empty in files written before intervals existed)
    intervals: dict[str, list[float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:  # strict JSON stores an undefined figure as null
        for name in ("top1", "top5", "auroc", "far", "tar"):
            if getattr(self, name) is None:
                setattr(self, name, math.nan)
        self.recall = {k: math.nan if v is None else v for k, v in self.recall.items()}

    def cell(self, name: str, value: float) -> str:
        """``value [lo, hi]`` (AUROC with three decimals, percentages with two)."""
        digits = 3 if name == "auroc" else 2
        if value is None or math.isnan(value):
            return "–"
        bounds = self.intervals.get(name)
        text = f"{value:.{digits}f}"
        if bounds and None not in bounds:
            text += " " + Interval(value, bounds[0], bounds[1], 0, 3 if name == "auroc" else 1).bounds
        return text


@dataclass
class OpenSetResult:
    rows: list[OpenSetRow]
    threshold: float
    threshold_source: str
    unseen: list[dict[str, Any]]  # the unseen classes: global index, name, sku, type
    seen_shots: int

    @property
    def overall(self) -> OpenSetRow:
        return self.rows[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, nan written as None (``null``: strict parsers and ``jq`` reject NaN)."""
        return _nulls({"rows": [asdict(r) for r in self.rows], "threshold": self.threshold,
                       "threshold_source": self.threshold_source, "unseen": self.unseen,
                       "seen_shots": self.seen_shots})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OpenSetResult":
        """Read back :meth:`to_dict` (also files written before intervals existed)."""
        return cls([OpenSetRow(**row) for row in data["rows"]], data["threshold"], data["threshold_source"],
                   data["unseen"], data["seen_shots"])

    def to_markdown(self) -> str:
        """The open-set table: one row per type meta-category, then all."""
        recall_names = [f"r@{k} {s}-shot" for s in SHOTS for k in KS]
        header = ["meta-category", "seen / unseen classes", "closed-set top-1", "top-5", *recall_names,
                  "AUROC", f"FAR @ TAR {DEFAULT_TAR:.0%}", "test TAR"]
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for r in self.rows:
            cells = [r.group, f"{r.seen_classes} / {r.unseen_classes}", format_percent(r.top1), format_percent(r.top5),
                     *(r.cell(name, r.recall[name]) for name in recall_names),
                     r.cell("auroc", r.auroc), r.cell("far", r.far), r.cell("tar", r.tar)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _percent(hits: np.ndarray) -> float:
    return 100.0 * float(np.mean(hits)) if len(hits) else math.nan


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _nulls(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _nulls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulls(v) for v in value]
    return value




def evaluate_openset(
    run: str | Path | TrainedModel, shards: str | Path | None = None, out: str | Path | None = None,
    seen_shots: int = 5, tar: float = DEFAULT_TAR, batch_size: int = 64, workers: int = 2,
) -> OpenSetResult:
    """The open-set table of a run trained with ``data.holdout_classes`` (see the module
    docstring); written as ``openset.json`` and ``openset.md`` into the run folder or ``out``."""
    trained = run if isinstance(run, TrainedModel) else load_trained(run)
    config = trained.checkpoint["config"]["data"]
    manifest = Manifest.load(shards or config["shards"])
    unseen = sorted(int(c["global_index"]) for c in trained.classes if c.get("unseen"))
    if not unseen:
        raise DataError(f"{trained.name} was trained on every class: there is no unseen class to evaluate",
                        hint="train with data.holdout_classes (a count, a fraction or a list of classes)")
    seen = sorted(int(c["global_index"]) for c in trained.classes if not c.get("unseen"))
    fraction = float(config.get("holdout", 0.0))
    if fraction <= 0:
        raise DataError("the open-set threshold is chosen on the validation split, and the run held none out",
                        hint="train with data.holdout > 0 (e.g. 0.1) as well as data.holdout_classes")
    validation = validation_keys(manifest, fraction, holdout_of(config)[1])
    train = shard_samples(manifest, "train", seen + unseen)
    test = shard_samples(manifest, "test", seen + unseen)
    unseen_train = train[train["class"].isin(unseen)]
    galleries = {s: shots(unseen_train, s) for s in SHOTS}
    seen_gallery = shots(train[train["class"].isin(seen) & ~train["key"].isin(validation)], seen_shots)
    valid = train[train["class"].isin(seen) & train["key"].isin(validation)]
    if valid.empty:
        raise DataError(f"data.holdout={fraction:g} holds out no image of the seen classes")
    keys = sorted(set().union(*(g["key"] for g in galleries.values()), seen_gallery["key"], valid["key"], test["key"]))
    found = shard_features(trained, manifest, keys, batch_size, workers)

    def matrix(frame: pd.DataFrame) -> np.ndarray:
        return np.stack([found[k] for k in frame["key"]]).astype(np.float32)

    seen_vectors = matrix(seen_gallery)
    threshold = calibrate_threshold((matrix(valid) @ seen_vectors.T).max(axis=1), tar)
    test_known, test_unknown = test[test["class"].isin(seen)], test[test["class"].isin(unseen)]
    known_scores = (matrix(test_known) @ seen_vectors.T).max(axis=1)
    unknown_vectors = matrix(test_unknown)
    unknown_scores = (unknown_vectors @ seen_vectors.T).max(axis=1)
    labels = test_unknown["class"].to_numpy()
    hits = {f"r@{k} {s}-shot": recall_at(unknown_vectors, labels, matrix(galleries[s]),
                                         galleries[s]["class"].to_numpy(), k) for s in SHOTS for k in KS}
    run_dir = None if isinstance(run, TrainedModel) else find_run_dir(run)
    evaluation = read_json(RunStorage.at(run_dir), run_folder.EVALUATION) if run_dir else None
    closed = {r["group"]: r for r in (evaluation or {}).get("table2", {}).get("by_type", [])}
    overall = (evaluation or {}).get("table2", {}).get("overall", {})
    types = {int(c["index"]): c["type"] for c in manifest.classes}
    groups = [t for t in TYPES if any(types[c] == t for c in seen + unseen)]
    groups += sorted({types[c] for c in seen + unseen} - set(groups))
    rows = []
    known_type = test_known["class"].map(types).to_numpy()
    unknown_type = test_unknown["class"].map(types).to_numpy()
    known_labels = test_known["class"].to_numpy()
    for group in [*groups, ALL]:
        k_mask = np.ones(len(known_type), bool) if group == ALL else known_type == group
        u_mask = np.ones(len(unknown_type), bool) if group == ALL else unknown_type == group
        ref = overall if group == ALL else closed.get(group, {})
        accepted_unknown = unknown_scores[u_mask] >= threshold
        accepted_known = known_scores[k_mask] >= threshold
        intervals = {name: proportion_interval(h[u_mask], labels[u_mask]).limits() for name, h in hits.items()}
        intervals["auroc"] = auroc_interval(known_scores[k_mask], unknown_scores[u_mask]).limits()
        intervals["far"] = proportion_interval(accepted_unknown, labels[u_mask]).limits()
        intervals["tar"] = proportion_interval(accepted_known, known_labels[k_mask]).limits()
        rows.append(OpenSetRow(
            group, sum(1 for c in seen if group in (ALL, types[c])), sum(1 for c in unseen if group in (ALL, types[c])),
            int(k_mask.sum()), int(u_mask.sum()), _number(ref.get("top1")),
            _number(ref.get("top5")), {name: _percent(h[u_mask]) for name, h in hits.items()},
            auroc(known_scores[k_mask], unknown_scores[u_mask]),
            _percent(accepted_unknown), _percent(accepted_known), intervals))
    result = OpenSetResult(
        rows, threshold, f"accepts {tar:.0%} of {len(valid)} validation images (data.holdout {fraction:g}) against "
                         f"the seen classes' {seen_shots}-shot gallery",
        [{"class": c, "name": manifest.classes[c]["name"], "sku": manifest.classes[c].get("sku", ""),
          "type": types[c]} for c in unseen], seen_shots)
    target = RunStorage.at(out) if out is not None else (RunStorage.at(run_dir) if run_dir else None)
    if target is not None:
        write_json(target, run_folder.OPENSET, result.to_dict())
        target.write_text(run_folder.OPENSET_TABLE, result.to_markdown() + "\n")
    return result
