"""The paper's final system (Table 3): a general ResNet-34 for every image plus one
API-Net specialist per hard meta-category (liquor, cosmetics).

The paper does not say how images reach a specialist nor how Table 3's test set is
formed. What this module does:

Routing (:func:`route`, :func:`route_by_mass`)
    Only the general model's predictions decide, never the true label. Rule ``"top1"``:
    an image goes to the specialist of the meta-category of the general model's top-1
    class. Rule ``"top5-majority"``: to the specialist of the meta-category most frequent
    among the general top-5 classes (a tie goes to the category of the higher-ranked
    class). Routing by mass: to the specialist whose category holds at least its
    threshold of the general model's probability (the softmax summed over the category's
    classes), the largest such mass when several do; the threshold of each category is
    chosen on a validation split carved from train (:func:`calibrate_threshold`), never
    on test. Other images stay with the general model.

Combining (:func:`combine`)
    A routed image's ensemble top-k is the specialist's top-k, mapped to global class ids
    (a specialist only knows its own category's classes). The general model's answer for
    that image is discarded, except to fill top-k slots the specialist cannot fill.

Table 3 (:func:`table3`)
    For a meta-category C, the test set is every test image whose TRUE class is in C.
    "General" (a) is the general model's top-1/top-5 among all classes on those images (so
    it equals C's Table 2 row, as it does in the paper). "Ensemble" (d) is the routed
    ensemble's top-1/top-5 on the same images: misrouting is charged to the ensemble.
    Between them, so that a gain or a loss can be traced: (b) the general model among C's
    classes only (what perfect routing without a specialist gives), (c) the specialist
    alone on all of C's images (perfect routing with it), and per routing rule the recall
    (share of C's images sent to C's specialist) and the precision (share of C's images
    among those sent to it). (e) is the ensemble routed by mass, charged like (d).
    Consequences, stated so the numbers can be read correctly:

    - Rule ``"top1"``: an image of C whose general top-1 lies outside C is not sent to
      C's specialist, and its ensemble top-1 (the general one, or another category's
      specialist's) lies outside C, so it is a top-1 error of both models. The
      ensemble's top-1 on C is therefore at most the share of C's images routed to C's
      specialist. With ``"top5-majority"`` an image of C kept by the general model can
      still be right.
    - An image of C sent to another category's specialist gets only that specialist's
      classes, all outside C: a top-1 error, and a top-5 error unless the true class
      is among the general model's fill slots (specialists with fewer than k classes).
    - Images of other categories routed into C's specialist are not in C's test set;
      they count in their own category's row and in the overall accuracy.

    The other possible reading, each specialist classifying its category's images among
    its category's classes only (perfect routing), is column (c).

Intervals (:mod:`rp2k_dist.evaluation.stats`)
    Every column carries its 95 % bootstrap interval, and the comparisons that decide,
    (b) - (a), (c) - (b), (d) - (a) and (e) - (a), are paired bootstraps on the category's
    images with McNemar's exact test (:data:`~.table3_text.DIFFERENCES`).
    :func:`~.table3_text.verdict` says "helped" or "hurt" only where the interval of (d) - (a)
    excludes 0.

Table 3 as text (Markdown, the differences, the verdict) is :mod:`.table3_text`'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from .metrics import top_k_accuracy
from .predictions import Predictions, class_column
from .stats import paired_difference, proportion_interval

from .table3_text import DIFFERENCES


SYSTEMS = ("type", "shape")
RULES = ("top1", "top5-majority")


@dataclass(frozen=True)
class Specialist:
    """A fine-grained model trained on one meta-category's classes.

    ``classes`` are global class indices in the specialist's label order: specialist
    label j is global class ``classes[j]``. (It has a default only so that the field
    order meta_category, system, classes can stay; it must not be empty.)
    """

    meta_category: str  # e.g. "liquor"; compared case-insensitively (stored casefolded)
    system: str = "type"  # "type" or "shape"
    classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"specialist system must be one of {SYSTEMS}, got {self.system!r}")
        if not self.classes:
            raise ValueError(f"specialist for {self.meta_category!r} has no classes")
        object.__setattr__(self, "classes", tuple(int(c) for c in self.classes))
        object.__setattr__(self, "meta_category", self.meta_category.strip().casefold())

    @classmethod
    def for_meta_category(
        cls, classes: list[dict[str, Any]], meta_category: str, system: str = "type"
    ) -> "Specialist":
        """The specialist of every class of ``meta_category`` in the manifest class table,
        labels in global index order."""
        members = np.flatnonzero(_categories(classes, system) == meta_category.strip().casefold())
        return cls(meta_category, system, tuple(int(c) for c in members))


def _categories(classes: list[dict[str, Any]], system: str) -> np.ndarray:
    """Per-class meta-category of ``system``, casefolded for case-insensitive matching."""
    return np.array([value.casefold() for value in class_column(classes, system)], dtype=object)


def route(
    general_topk: np.ndarray,
    classes: list[dict[str, Any]],
    specialists: Sequence[Specialist],
    rule: str = "top1",
) -> np.ndarray:
    """int64 [N]: index into ``specialists`` of the specialist each sample goes to, -1 =
    stays with the general model. ``general_topk`` is [N, K] global classes, best first.

    See the module docstring for the rules. When specialists of both systems claim a
    sample (say type=liquor and shape=bottle), the first one in ``specialists`` wins.
    """
    if rule not in RULES:
        raise ConfigError(f"unknown routing rule {rule!r}; known: {RULES}")
    seen = [(s.system, s.meta_category) for s in specialists]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"two specialists for the same meta-category: {seen}; pass one per meta-category")
    general_topk = np.asarray(general_topk)
    decided: dict[str, np.ndarray] = {}
    for system in {s.system for s in specialists}:
        category = _categories(classes, system)[general_topk]  # [N, K]
        if rule == "top1":
            decided[system] = category[:, 0]
        else:
            category = category[:, :5]
            votes = (category[:, :, None] == category[:, None, :]).sum(axis=2)  # [N, K]
            # argmax takes the first maximum: the tied category with the best-ranked class
            decided[system] = category[np.arange(len(category)), votes.argmax(axis=1)]
    routes = np.full(len(general_topk), -1, dtype=np.int64)
    for index, specialist in enumerate(specialists):
        routes[(routes == -1) & (decided[specialist.system] == specialist.meta_category)] = index
    return routes


def route_by_mass(mass: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """int64 [N]: the specialist each sample goes to by probability mass, -1 = none.

    ``mass`` [N, S]: the general model's softmax summed over specialist s's classes
    (:attr:`Predictions.mass`); a sample goes to the specialist with the largest mass among
    those whose mass is >= their threshold (ties: the first)."""
    mass = np.asarray(mass, dtype=np.float64)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if mass.ndim != 2 or mass.shape[1] != len(thresholds):
        raise ValueError(f"mass {mass.shape} needs one column per threshold ({len(thresholds)})")
    passing = mass >= thresholds[None, :]
    routes = np.where(passing, mass, -np.inf).argmax(axis=1).astype(np.int64) if mass.shape[1] else \
        np.full(len(mass), -1, dtype=np.int64)
    routes[~passing.any(axis=1)] = -1
    return routes


def calibrate_threshold(mass: np.ndarray, inside: np.ndarray) -> float:
    """The threshold t of "route when mass >= t" that misroutes the fewest validation
    images: the category's images with mass < t plus other images with mass >= t.

    ``mass`` [N]: the general model's probability on the category; ``inside`` bool [N]:
    the image's true class is in it. Candidates lie halfway between consecutive distinct
    masses (and below the lowest; +inf routes nothing), so t keeps a margin on both sides;
    of equally good ones the lowest wins, as the specialist is the better model for the
    images it should get. No image of the category: +inf."""
    mass = np.asarray(mass, dtype=np.float64)
    inside = np.asarray(inside, dtype=bool)
    if mass.shape != inside.shape or mass.ndim != 1:
        raise ValueError(f"mass {mass.shape} and inside {inside.shape} must be [N]")
    if not inside.any():
        return math.inf
    values = np.unique(mass)
    candidates = np.concatenate([[values[0] / 2], (values[:-1] + values[1:]) / 2, [math.inf]])
    routed = mass[None, :] >= candidates[:, None]  # [T, N]
    errors = (~routed & inside).sum(axis=1) + (routed & ~inside).sum(axis=1)
    return float(candidates[int(np.argmin(errors))])


def combine(
    general: Predictions,
    specialist_preds: dict[int, Predictions],
    routes: np.ndarray,
    specialists: Sequence[Specialist],
    k: int = 5,
) -> Predictions:
    """The ensemble's predictions, in ``general``'s sample order, top-k width k (clipped
    to ``general.k``).

    ``routes`` [N] comes from :func:`route`. ``specialist_preds[s]`` holds specialist s's
    predictions in its own label space for (at least) the samples routed to it, matched
    by key; extra samples are ignored, a missing one is a ValueError. A routed sample's
    top-k = the specialist's top-k mapped to global ids with the specialist's scores;
    when the specialist lists fewer than k classes, the remaining slots take the general
    model's best classes not already listed, with the general model's scores (so scores
    of one row may come from two models and need not decrease). Other samples keep the
    general top-k.
    """
    routes = np.asarray(routes)
    if routes.shape != (len(general),):
        raise ValueError(f"routes has shape {routes.shape}, expected ({len(general)},)")
    k = min(k, general.k)
    topk, scores = general.topk[:, :k].copy(), general.scores[:, :k].copy()
    for index, specialist in enumerate(specialists):
        rows = np.flatnonzero(routes == index)
        if len(rows) == 0:
            continue
        if index not in specialist_preds:
            raise ValueError(
                f"{len(rows)} samples routed to specialist {index} ({specialist.meta_category!r}) "
                "but no predictions of it were given"
            )
        preds = specialist_preds[index]
        position = {key: i for i, key in enumerate(preds.keys)}
        missing = [general.keys[r] for r in rows if general.keys[r] not in position]
        if missing:
            raise ValueError(
                f"specialist {specialist.meta_category!r} has no predictions for {len(missing)} "
                f"routed samples, e.g. {missing[:3]}"
            )
        source = np.array([position[general.keys[r]] for r in rows], dtype=np.int64)
        width = min(k, preds.k)
        own = np.asarray(specialist.classes)[preds.topk[source, :width]]  # [R, width] global ids
        own_scores = preds.scores[source, :width]
        if width < k:
            fallback = general.topk[rows]  # [R, K]; at most `width` of them are already listed
            listed = (fallback[:, :, None] == own[:, None, :]).any(axis=2)
            pick = np.argsort(listed, axis=1, kind="stable")[:, : k - width]  # unlisted, best first
            own = np.concatenate([own, np.take_along_axis(fallback, pick, axis=1)], axis=1)
            own_scores = np.concatenate([own_scores, np.take_along_axis(general.scores[rows], pick, axis=1)], axis=1)
        topk[rows], scores[rows] = own, own_scores
    return Predictions(list(general.keys), general.labels.copy(), topk, scores)


def within_category(predictions: Predictions, classes: list[dict[str, Any]], specialist: Specialist) -> Predictions:
    """The samples whose TRUE class belongs to the specialist's meta-category (in its
    system): Table 3's test set for that category."""
    category = _categories(classes, specialist.system)[predictions.labels]
    return predictions.subset(category == specialist.meta_category)


def in_global_classes(
    predictions: Predictions, classes: Sequence[int], general: Predictions, what: str = "predictions"
) -> Predictions:
    """``predictions`` made in the label space of ``classes`` (label j = global class
    ``classes[j]``: a specialist, or the general model restricted to a category), for the
    samples of ``general`` (matched by key, in its order), with top-k mapped to global
    class ids and the true labels of ``general``. Raises ValueError when a sample of
    ``general`` has no prediction (``what`` names the source in the message)."""
    position = {key: i for i, key in enumerate(predictions.keys)}
    missing = [key for key in general.keys if key not in position]
    if missing:
        raise ValueError(f"{what} has no predictions for {len(missing)} of the category's images, e.g. {missing[:3]}")
    rows = np.array([position[key] for key in general.keys], dtype=np.int64)
    table = np.asarray(classes, dtype=np.int64)
    return Predictions(list(general.keys), general.labels.copy(), table[predictions.topk[rows]], predictions.scores[rows])


def table3(
    general: Predictions,
    ensemble: Predictions,
    classes: list[dict[str, Any]],
    specialists: Sequence[Specialist],
    routes: np.ndarray | None = None,
    restricted: dict[int, Predictions] | None = None,
    specialist_preds: dict[int, Predictions] | None = None,
    mass_ensemble: Predictions | None = None,
    mass_routes: np.ndarray | None = None,
    thresholds: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One row per specialist, accuracies in percent on the category's test images (every
    test image whose TRUE class is in the category):

    * ``general_top1/5`` (a): the general model among all classes (its Table 2 row);
    * ``restricted_top1/5`` (b): the general model among the category's classes only
      (argmax over them: perfect routing, no specialist), from ``restricted[s]``, the
      general model's predictions in specialist s's label space;
    * ``specialist_top1/5`` (c): specialist s alone (``specialist_preds[s]``, its own
      label space), every category image given to it;
    * ``ensemble_top1/5`` (d): the ensemble routed by ``routes`` (:func:`route`), with
      ``routing_recall`` (share of the category's images routed to its specialist, %),
      ``routing_precision`` (share of the category's images among those routed to it, %)
      and ``routed_in`` (the other categories' images routed to it);
    * ``mass_top1/5`` (e): the ensemble routed by mass (``mass_ensemble``, routed by
      ``mass_routes`` from :func:`route_by_mass` with ``thresholds``), with
      ``mass_recall``, ``mass_precision``, ``mass_routed_in`` and ``mass_threshold``.

    (b) - (a) is what knowing the category is worth, (c) - (b) what the specialist adds
    over the general model on its classes, (d) - (c) and (e) - (c) what routing costs.
    Columns whose input is not given are None; a precision with nothing routed is NaN.
    ``restricted`` and ``specialist_preds`` are matched by key and must cover the
    category's images."""
    for name, other in (("ensemble", ensemble), ("mass_ensemble", mass_ensemble)):
        if other is not None and (general.keys != other.keys or not np.array_equal(general.labels, other.labels)):
            raise ValueError(f"general and {name} predictions must cover the same samples in the same order")
    for name, given in (("routes", routes), ("mass_routes", mass_routes)):
        if given is not None and np.shape(given) != (len(general),):
            raise ValueError(f"{name} has shape {np.shape(given)}, expected ({len(general)},)")
    rows = []
    for index, specialist in enumerate(specialists):
        inside = class_column(classes, specialist.system)[general.labels] == specialist.meta_category
        plain = general.subset(inside)
        row: dict[str, Any] = {"meta_category": specialist.meta_category, "samples": len(plain)}
        parts = {"general": plain, "restricted": None, "specialist": None, "ensemble": ensemble.subset(inside),
                 "mass": None if mass_ensemble is None else mass_ensemble.subset(inside)}
        for name, given in (("restricted", restricted), ("specialist", specialist_preds)):
            if given is not None and index in given:
                parts[name] = in_global_classes(given[index], specialist.classes, plain,
                                                f"{name} ({specialist.meta_category})")
        hits = {}  # top-1 correctness per column, for the paired differences
        for name, preds in parts.items():
            for k in (1, 5):
                right = None if preds is None else (preds.topk[:, :k] == preds.labels[:, None]).any(axis=1)
                hits.setdefault(name, right)
                row[f"{name}_top{k}"] = None if preds is None else 100 * top_k_accuracy(preds.labels, preds.topk, k)
                row[f"{name}_top{k}_ci"] = (proportion_interval(right, preds.labels).limits()
                                            if right is not None and len(right) else None)
        row["differences"] = {
            label: paired_difference(hits[first], hits[second], plain.labels).to_dict()
            for label, first, second in DIFFERENCES if hits[first] is not None and hits[second] is not None
        }
        for prefix, given in (("routing", routes), ("mass", mass_routes)):
            recall, precision, routed_in = _routing(given, index, inside)
            row[f"{prefix}_recall"], row[f"{prefix}_precision"] = recall, precision
            row["routed_in" if prefix == "routing" else "mass_routed_in"] = routed_in
        row["mass_threshold"] = None if thresholds is None else float(thresholds[index])
        rows.append(row)
    return rows


def _routing(routes: np.ndarray | None, index: int, inside: np.ndarray) -> tuple[Any, Any, Any]:
    """(recall %, precision %, others routed in) of specialist ``index``; Nones without routes."""
    if routes is None:
        return None, None, None
    sent = np.asarray(routes) == index
    recall = 100 * float(sent[inside].mean()) if inside.any() else math.nan
    precision = 100 * float(inside[sent].mean()) if sent.any() else math.nan
    return recall, precision, int(sent[~inside].sum())
