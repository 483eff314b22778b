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
* **open-set scores** (:mod:`.ood_scores`: max softmax, max logit, energy, k-NN distance to
  the training embeddings, best similarity to a ``seen_shots`` gallery of the seen classes):
  the unseen classes are split in two disjoint sets (:func:`~..data.holdout.split_unseen`);
  the score with the best AUROC on **validation** (the validation split of the seen classes,
  ``data.holdout``, against every image of the validation-unseen classes) is chosen, with its
  k and its threshold (accepting ``tar`` of the validation known images); every score's
  AUROC, FPR at 95 % TPR, FAR and TAR are reported on **test** (seen test images against the
  test-unseen classes' test images), the threshold applied unchanged.
* **catalogue-wide recall@k**: the unseen queries against a gallery of every class (the
  seen classes' gallery plus the unseen shots), beside the unseen-only figure.
* **open-set accuracy**: seen and test-unseen test images answered right by a gallery of
  the seen classes with the chosen score (their SKU, or ``unknown`` for a product without
  gallery images), as ``rp2k predict --gallery`` answers.

Every figure carries its 95 % bootstrap interval (:mod:`~.stats`: recall and TAR resampled
within each class, AUROC within the known and the unknown images). Written to the run
folder (or ``out``) as ``openset.json`` (strict JSON: an undefined figure is ``null``) and
``openset.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import run_folder
from ..data.holdout import holdout_of, split_unseen
from ..data.manifest import Manifest
from ..data.metadata import TYPES
from ..errors import DataError
from ..run_folder import find_checkpoint, find_run_dir, read_json
from ..storage import RunStorage
from .embeddings import logits_of_features, shard_features, shard_samples
from .gallery import DEFAULT_TAR
from .gallery_build import shots, validation_keys
from .inference import TrainedModel, load_trained
from .metrics import format_percent
from .ood_scores import KNN_KS, SCORES, choose, knn_of_similarity, kth_similarity, logit_scores, score_row, scores_markdown
from .stats import Interval, auroc, auroc_interval, proportion_interval

SHOTS = (1, 5)
KS = (1, 5)
ALL = "all"
#: Prefix of the recall names measured against a gallery of every class.
CATALOGUE = "catalogue "


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
    #: "r@1 1-shot", "r@5 1-shot", "r@1 5-shot", "r@5 5-shot" (against the unseen classes'
    #: gallery) and the same names prefixed "catalogue " (against every class's gallery)
    recall: dict[str, float]
    auroc: float  # the chosen score, seen vs test-unseen test images
    far: float  # test-unseen test images accepted at the threshold
    tar: float  # seen test images accepted at the threshold
    #: 95 % bounds [low, high] of each recall name, "auroc", "far", "tar" and "accuracy" (None =
    #: undefined; empty in files written before intervals existed)
    intervals: dict[str, list[float | None]] = field(default_factory=dict)
    #: open-set accuracy: seen and test-unseen test images answered right (their SKU, or
    #: unknown for a product without gallery images); None in files written before it existed
    accuracy: float | None = None

    def __post_init__(self) -> None:  # strict JSON stores an undefined figure as null
        for name in ("top1", "top5", "auroc", "far", "tar", "accuracy"):
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
    #: every score's figures (:class:`~.ood_scores.ScoreRow` as dicts); empty in older files
    scores: list[dict[str, Any]] = field(default_factory=list)
    chosen: str = "gallery"  # the score chosen on validation, used by the rows and by galleries
    chosen_k: int | None = None  # its k (knn)
    chosen_reason: str = ""
    validation_unseen: list[int] = field(default_factory=list)  # classes the score was chosen on
    test_unseen: list[int] = field(default_factory=list)  # classes it is reported on
    validation_images: dict[str, int] = field(default_factory=dict)  # "known", "unknown"

    @property
    def overall(self) -> OpenSetRow:
        return self.rows[-1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, nan written as None (``null``: strict parsers and ``jq`` reject NaN)."""
        return _nulls({"rows": [asdict(r) for r in self.rows], "threshold": self.threshold,
                       "threshold_source": self.threshold_source, "unseen": self.unseen,
                       "seen_shots": self.seen_shots, "scores": self.scores, "chosen": self.chosen,
                       "chosen_k": self.chosen_k, "chosen_reason": self.chosen_reason,
                       "validation_unseen": self.validation_unseen, "test_unseen": self.test_unseen,
                       "validation_images": self.validation_images})

    def to_json(self) -> str:
        """Strict JSON (``allow_nan=False``: an undefined figure is ``null``)."""
        return json.dumps(self.to_dict(), indent=1, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OpenSetResult":
        """Read back :meth:`to_dict` (also files written before intervals or scores existed)."""
        extra = {name: data[name] for name in ("scores", "chosen", "chosen_k", "chosen_reason", "validation_unseen",
                                               "test_unseen", "validation_images") if data.get(name) is not None}
        return cls([OpenSetRow(**row) for row in data["rows"]], data["threshold"], data["threshold_source"],
                   data["unseen"], data["seen_shots"], **extra)

    @property
    def chosen_label(self) -> str:
        return f"knn (k={self.chosen_k})" if self.chosen == "knn" and self.chosen_k else self.chosen

    def names(self, classes: list[int]) -> str:
        by_class = {int(c["class"]): c["name"] for c in self.unseen}
        return ", ".join(str(by_class.get(int(c), c)) for c in classes) or "none"

    def scores_markdown(self) -> str:
        """The per-score table (:func:`~.ood_scores.scores_markdown`), the chosen one marked."""
        return scores_markdown(self.scores, self.chosen)

    def choice_line(self) -> str:
        """Which score was chosen, on what, and why."""
        images = self.validation_images
        return (f"Chosen on validation: **{self.chosen_label}**, {self.chosen_reason}; validation = "
                f"{images.get('known', 0)} validation-split images of the seen classes (known) vs "
                f"{images.get('unknown', 0)} images of the validation-unseen classes ({self.names(self.validation_unseen)}); "
                f"test = the seen classes' test images vs the test images of the test-unseen classes "
                f"({self.names(self.test_unseen)}), never used for a choice. Its threshold "
                f"{self.threshold:.4g} accepts {DEFAULT_TAR:.0%} of the validation known images and is applied "
                f"unchanged to test.")

    def to_markdown(self) -> str:
        """The open-set table: one row per type meta-category, then all."""
        recall_names = [f"r@{k} {s}-shot" for s in SHOTS for k in KS]
        catalogue = [f"{CATALOGUE}{name}" for name in recall_names]
        shown = [n for n in catalogue if any(n in r.recall for r in self.rows)]
        header = ["meta-category", "seen / unseen classes", "closed-set top-1", "top-5", *recall_names,
                  *[f"cat. {n[len(CATALOGUE):]}" for n in shown], f"AUROC ({self.chosen_label})",
                  f"FAR @ TAR {DEFAULT_TAR:.0%}", "test TAR"]
        if any(not math.isnan(r.accuracy) for r in self.rows):
            header.append("open-set accuracy")
        lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
        for r in self.rows:
            cells = [r.group, f"{r.seen_classes} / {r.unseen_classes}", format_percent(r.top1), format_percent(r.top5),
                     *(r.cell(name, r.recall.get(name, math.nan)) for name in recall_names),
                     *(r.cell(name, r.recall.get(name, math.nan)) for name in shown),
                     r.cell("auroc", r.auroc), r.cell("far", r.far), r.cell("tar", r.tar)]
            if len(cells) < len(header):
                cells.append(r.cell("accuracy", r.accuracy))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def full_markdown(self) -> str:
        """``openset.md``: the per-score table, the choice, then the per-category table."""
        parts = []
        if self.scores:
            parts += [self.scores_markdown(), "", self.choice_line(), ""]
        return "\n".join(parts + [self.to_markdown()])


def report_parts(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The run report's open-set section from ``openset.json``: ("para" | "table", text)
    pieces in order (:mod:`rp2k_dist.analysis.report` adds them to its document)."""
    result = OpenSetResult.from_dict(data)
    parts = [("para", f"{len(result.unseen)} unseen classes (`data.holdout_classes`): "
                      f"{', '.join(c['name'] for c in result.unseen)}.")]
    if result.scores:
        parts += [("para", "Open-set scores (higher = more known), known = seen classes' images, unknown = unseen "
                           "classes' images; AUROC 0 to 1, FPR at 95 % TPR, FAR and TAR in percent, each with its "
                           "95 % bootstrap interval:"),
                  ("table", result.scores_markdown()), ("para", result.choice_line())]
    parts += [("para", "Closed-set top-1 / top-5: the classifier on the seen classes' test images. Recall@k, 1- and "
                       "5-shot: unseen test images against a gallery of 1 or 5 train images per unseen class; "
                       "\"cat.\": against a gallery of every class (the seen classes' "
                       f"{result.seen_shots}-shot gallery plus the unseen shots). AUROC, FAR, TAR: the chosen score "
                       f"({result.chosen_label}) at the threshold {result.threshold:.4g} ({result.threshold_source}). "
                       "Open-set accuracy: seen and test-unseen test images answered right by the gallery (their "
                       "SKU, or unknown for a product without gallery images)."),
              ("table", result.to_markdown())]
    return parts


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




def references(train: pd.DataFrame, seen: list[int], validation: set[str], seen_shots: int
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the seen classes' ``seen_shots``-shot gallery, the k-NN bank: every train image of
    the seen classes outside the validation split, i.e. what the model trained on)."""
    bank = train[train["class"].isin(seen) & ~train["key"].isin(validation)]
    return shots(bank, seen_shots), bank


def all_scores(vectors: np.ndarray, logits: np.ndarray, gallery_vectors: np.ndarray, bank: np.ndarray,
               ks: tuple[int, ...] = KNN_KS) -> dict[str, np.ndarray]:
    """Every score of queries (unit-norm ``vectors``, trained-class ``logits``): the logit
    scores, ``gallery`` and ``knn@k`` for each k."""
    out = logit_scores(logits)
    sims = kth_similarity(vectors, bank, ks)
    out.update({f"knn@{k}": knn_of_similarity(v) for k, v in sims.items()})
    out["gallery"] = kth_similarity(vectors, gallery_vectors, [1])[1]
    return out


def best_class(vectors: np.ndarray, gallery_vectors: np.ndarray, gallery_classes: np.ndarray) -> np.ndarray:
    """The class of each query's most similar gallery vector (the gallery's answer)."""
    return gallery_classes[np.argmax(vectors @ gallery_vectors.T, axis=1)]


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
    validation_unseen, test_unseen = split_unseen(manifest.classes, unseen)
    validation = validation_keys(manifest, fraction, holdout_of(config)[1])
    train = shard_samples(manifest, "train", seen + unseen)
    test = shard_samples(manifest, "test", seen + unseen)
    unseen_train = train[train["class"].isin(unseen)]
    galleries = {s: shots(unseen_train, s) for s in SHOTS}
    seen_gallery, bank = references(train, seen, validation, seen_shots)
    valid = train[train["class"].isin(seen) & train["key"].isin(validation)]
    if valid.empty:
        raise DataError(f"data.holdout={fraction:g} holds out no image of the seen classes")
    valid_unknown = pd.concat([train[train["class"].isin(validation_unseen)],
                               test[test["class"].isin(validation_unseen)]], ignore_index=True)
    keys = sorted(set().union(*(g["key"] for g in galleries.values()), bank["key"], valid["key"], test["key"],
                              valid_unknown["key"]))
    raw = shard_features(trained, manifest, keys, batch_size, workers, normalise=False)
    order = {k: i for i, k in enumerate(keys)}
    features = np.stack([raw[k] for k in keys]).astype(np.float32)
    vectors_all = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    logits_all = logits_of_features(trained, features)

    def matrix(frame: pd.DataFrame) -> np.ndarray:
        return vectors_all[[order[k] for k in frame["key"]]]

    def logits(frame: pd.DataFrame) -> np.ndarray:
        return logits_all[[order[k] for k in frame["key"]]]

    seen_vectors, bank_vectors = matrix(seen_gallery), matrix(bank)
    test_known, test_unknown = test[test["class"].isin(seen)], test[test["class"].isin(test_unseen)]

    def scored(frame: pd.DataFrame) -> dict[str, np.ndarray]:
        return all_scores(matrix(frame), logits(frame), seen_vectors, bank_vectors)

    v_known, v_unknown, t_known, t_unknown = (scored(f) for f in (valid, valid_unknown, test_known, test_unknown))
    unknown_strata = test_unknown["class"].to_numpy()
    classes_bank, classes_seen = bank["class"].to_numpy(), seen_gallery["class"].to_numpy()
    known_labels = test_known["class"].to_numpy()
    answers_bank = {"known": best_class(matrix(test_known), bank_vectors, classes_bank),
                    "unknown": best_class(matrix(test_unknown), bank_vectors, classes_bank)}
    answers_seen = {"known": best_class(matrix(test_known), seen_vectors, classes_seen),
                    "unknown": best_class(matrix(test_unknown), seen_vectors, classes_seen)}

    def open_set_hits(name: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """(hits of the seen test images, of the test-unseen ones) of a gallery answering with
        score ``name`` at ``threshold``: the ``seen_shots`` gallery for the gallery score,
        the whole training set of the seen classes for the others (what k-NN searches)."""
        answer = answers_seen if name == "gallery" else answers_bank
        known_hits = (t_known[name] >= threshold) & (answer["known"] == known_labels)
        return known_hits, t_unknown[name] < threshold

    rows_by_score = {}
    for name in SCORES:
        if name == "knn":
            candidates = [k for k in KNN_KS if f"knn@{k}" in v_known]
            measured = {k: auroc(v_known[f"knn@{k}"], v_unknown[f"knn@{k}"]) for k in candidates}
            finite = {k: a for k, a in measured.items() if math.isfinite(a)}
            k = max(finite, key=lambda k: (finite[k], -k)) if finite else candidates[-1]
            key = f"knn@{k}"
        else:
            k, key = None, name
        row = score_row(name, k, v_known[key], v_unknown[key], t_known[key], t_unknown[key], unknown_strata, tar)
        known_hits, unknown_hits = open_set_hits(key, row.threshold)
        hits = np.concatenate([known_hits, unknown_hits])
        accuracy = proportion_interval(hits, np.concatenate([known_labels, unknown_strata]))
        row.accuracy, row.intervals["accuracy"] = _finite(accuracy.estimate), accuracy.limits()
        rows_by_score[name] = (row, key)
    chosen, reason = choose([r for r, _ in rows_by_score.values()])
    chosen_key = rows_by_score[chosen.score][1]
    threshold = chosen.threshold
    known_scores, unknown_scores = t_known[chosen_key], t_unknown[chosen_key]
    known_hits, unknown_hits = open_set_hits(chosen_key, threshold)

    unknown_vectors = matrix(test[test["class"].isin(unseen)])
    all_unknown = test[test["class"].isin(unseen)]
    labels = all_unknown["class"].to_numpy()
    hits = {f"r@{k} {s}-shot": recall_at(unknown_vectors, labels, matrix(galleries[s]),
                                         galleries[s]["class"].to_numpy(), k) for s in SHOTS for k in KS}
    for s in SHOTS:  # every class in the gallery: the seen classes' gallery plus the unseen shots
        catalogue = pd.concat([seen_gallery, galleries[s]], ignore_index=True)
        for k in KS:
            hits[f"{CATALOGUE}r@{k} {s}-shot"] = recall_at(unknown_vectors, labels, matrix(catalogue),
                                                           catalogue["class"].to_numpy(), k)
    run_dir = None if isinstance(run, TrainedModel) else find_run_dir(run)
    # The run's Table 2 (closed-set columns) is its latest checkpoint's: not an earlier epoch's.
    latest = run_dir is not None and find_checkpoint(run) == find_checkpoint(run_dir)
    evaluation = read_json(RunStorage.at(run_dir), run_folder.EVALUATION) if latest else None
    closed = {r["group"]: r for r in (evaluation or {}).get("table2", {}).get("by_type", [])}
    overall = (evaluation or {}).get("table2", {}).get("overall", {})
    types = {int(c["index"]): c["type"] for c in manifest.classes}
    groups = [t for t in TYPES if any(types[c] == t for c in seen + unseen)]
    groups += sorted({types[c] for c in seen + unseen} - set(groups))
    rows = []
    known_type = test_known["class"].map(types).to_numpy()
    unknown_type = test_unknown["class"].map(types).to_numpy()
    recall_type = all_unknown["class"].map(types).to_numpy()
    for group in [*groups, ALL]:
        k_mask = np.ones(len(known_type), bool) if group == ALL else known_type == group
        u_mask = np.ones(len(unknown_type), bool) if group == ALL else unknown_type == group
        r_mask = np.ones(len(recall_type), bool) if group == ALL else recall_type == group
        ref = overall if group == ALL else closed.get(group, {})
        accepted_unknown = unknown_scores[u_mask] >= threshold
        accepted_known = known_scores[k_mask] >= threshold
        intervals = {name: proportion_interval(h[r_mask], labels[r_mask]).limits() for name, h in hits.items()}
        intervals["auroc"] = auroc_interval(known_scores[k_mask], unknown_scores[u_mask]).limits()
        intervals["far"] = proportion_interval(accepted_unknown, unknown_strata[u_mask]).limits()
        intervals["tar"] = proportion_interval(accepted_known, known_labels[k_mask]).limits()
        right = np.concatenate([known_hits[k_mask], unknown_hits[u_mask]])
        accuracy = proportion_interval(right, np.concatenate([known_labels[k_mask], unknown_strata[u_mask]]))
        intervals["accuracy"] = accuracy.limits()
        rows.append(OpenSetRow(
            group, sum(1 for c in seen if group in (ALL, types[c])), sum(1 for c in unseen if group in (ALL, types[c])),
            int(k_mask.sum()), int(r_mask.sum()), _number(ref.get("top1")),
            _number(ref.get("top5")), {name: _percent(h[r_mask]) for name, h in hits.items()},
            auroc(known_scores[k_mask], unknown_scores[u_mask]),
            _percent(accepted_unknown), _percent(accepted_known), intervals, _number(accuracy.estimate)))
    result = OpenSetResult(
        rows, threshold, f"{chosen.label} accepting {tar:.0%} of {len(valid)} validation images (data.holdout "
                         f"{fraction:g})" + (f" against the seen classes' {seen_shots}-shot gallery"
                                             if chosen.score == "gallery" else ""),
        [{"class": c, "name": manifest.classes[c]["name"], "sku": manifest.classes[c].get("sku", ""),
          "type": types[c]} for c in unseen], seen_shots,
        [asdict(r) for r, _ in rows_by_score.values()], chosen.score, chosen.k, reason, validation_unseen,
        test_unseen, {"known": len(valid), "unknown": len(valid_unknown)})
    target = RunStorage.at(out) if out is not None else (RunStorage.at(run_dir) if run_dir else None)
    if target is not None:
        target.write_text(run_folder.OPENSET, result.to_json() + "\n")
        target.write_text(run_folder.OPENSET_TABLE, result.full_markdown() + "\n")
    return result


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
