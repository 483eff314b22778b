"""Evaluate the paper's ensemble (Table 3) from trained runs.

A general model's run plus one API-Net specialist run per meta-category (trained with
``data.meta_category: type=liquor`` etc.) -> routed ensemble predictions on the test split,
Table 3 (within-category accuracy: general, general among the category's classes,
specialist alone, ensemble routed by the top-1 rule and by probability mass; each rule's
routing recall and precision) and the ensemble's Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import run_folder, storage
from ..config import parse_meta_category
from ..data.manifest import Manifest
from ..run_folder import find_run_dir
from ..data.chunks import SampleTable
from ..data.holdout import HOLDOUT, holdout_of
from ..storage import RunStorage
from ..errors import CheckpointError
from .ensemble import (
    Specialist, calibrate_threshold, combine, in_global_classes, route, route_by_mass, table3,
    within_category,
)
from .inference import load_trained, predict_shards
from .metrics import accuracy_table
from .predictions import Predictions, class_column
from .table3_text import differences_markdown, table3_markdown


@dataclass
class EnsembleResult:
    table3: list[dict[str, Any]]
    general: Predictions
    ensemble: Predictions  # (d): routed by ``rule``
    markdown: str
    mass_ensemble: Predictions | None = None  # (e): routed by probability mass
    thresholds: list[float] | None = None  # of (e), one per specialist
    threshold_source: str = ""  # how they were chosen


def specialist_of(trained) -> Specialist:
    """The Specialist (meta-category and global classes) a specialist checkpoint was trained on."""
    category = trained.checkpoint["config"]["data"]["meta_category"]
    if not category or trained.class_subset is None:
        raise CheckpointError(f"checkpoint of {trained.name} was not trained on one meta-category (data.meta_category)",
                              hint="pass a specialist's run folder to --specialist")
    system, value = parse_meta_category(category)
    return Specialist(value, system, tuple(trained.class_subset))


def mass_thresholds(general_model, shards: Path, specialists: list[Specialist], classes: list[dict[str, Any]],
                    workers: int = 2, given: float | None = None) -> tuple[list[float], str]:
    """The routing threshold of each specialist for (e), and how it was chosen: ``given``;
    else calibrated (:func:`~.ensemble.calibrate_threshold`) on the held-out part of train
    when the general run held one out (``data.holdout``); else 0.5 (more of the general
    model's probability inside the category than outside), said so."""
    if given is not None:
        return [float(given)] * len(specialists), f"given ({given})"
    holdout, holdout_by = holdout_of(general_model.checkpoint["config"]["data"])
    if holdout <= 0:
        return [0.5] * len(specialists), "0.5: the general run held out no train images (data.holdout=0)"
    if len(SampleTable.from_manifest(Manifest.load(shards), HOLDOUT, holdout=holdout, holdout_by=holdout_by)) == 0:
        return [0.5] * len(specialists), f"0.5: data.holdout={holdout:g} holds out no image of this dataset"
    validation = predict_shards(general_model, shards, split=HOLDOUT, workers=workers,
                                groups=[s.classes for s in specialists], holdout=holdout, holdout_by=holdout_by)
    insides = [class_column(classes, s.system)[validation.labels] == s.meta_category for s in specialists]
    thresholds = [calibrate_threshold(validation.mass[:, index], inside) for index, inside in enumerate(insides)]
    # what the thresholds do on the images they were chosen on, to read beside Table 3's
    # routing (e) on test: a large gap says the validation split does not resemble test
    routes = route_by_mass(validation.mass, thresholds)
    fitted = []
    for index, (specialist, inside) in enumerate(zip(specialists, insides)):
        sent = routes == index
        recall = f"{100 * sent[inside].mean():.1f}" if inside.any() else "–"
        precision = f"{100 * inside[sent].mean():.1f}" if sent.any() else "–"
        fitted.append(f"{specialist.meta_category} {recall} / {precision} ({int(inside.sum())} of its images)")
    return thresholds, (f"calibrated on the general run's {len(validation)} held-out train images "
                        f"(data.holdout={holdout:g}), not on test; routing (e) recall / precision there: "
                        + ", ".join(fitted))


def evaluate_ensemble(
    general_run: str | Path, specialist_runs: list[str | Path], shards: str | Path | None = None,
    out: str | Path | None = None, rule: str = "top1", workers: int = 2, mass_threshold: float | None = None,
) -> EnsembleResult:
    """Route every test image and score the ensemble: (d) by ``rule`` (the general model's
    top-1 meta-category by default), (e) by the general model's probability mass on each
    category (:func:`mass_thresholds`; ``mass_threshold`` fixes it for every category).

    Writes ``ensemble.json``, ``table3.md``, ``ensemble_table2.md`` and the predictions
    behind every Table 3 column into ``out`` (default: the general run's folder; run
    folders and ``out`` may be local, mounted or in object storage):
    ``ensemble_predictions.parquet`` (d), ``ensemble_mass_predictions.parquet`` (e),
    ``ensemble_general_predictions.parquet`` (a, and the top-1 routing), and per category
    ``ensemble_<category>_restricted.parquet`` (b) and ``ensemble_<category>_specialist.parquet``
    (c), all in global class ids.
    """
    general_model = load_trained(general_run)
    if general_model.class_subset is not None:
        raise CheckpointError("the general model must be trained on all classes (no data.meta_category)",
                              hint="pass the general ResNet-34's run folder first, specialists with --specialist")
    shards = str(shards or general_model.checkpoint["config"]["data"]["shards"])
    classes = Manifest.load(shards).classes
    experts = [load_trained(run) for run in specialist_runs]
    specialists = [specialist_of(trained) for trained in experts]
    general = predict_shards(general_model, shards, workers=workers, groups=[s.classes for s in specialists])
    predictions, restricted = {}, {}
    for index, (trained, specialist) in enumerate(zip(experts, specialists)):
        # every test image: the ones routed here are then picked by key
        predictions[index] = predict_shards(trained, shards, workers=workers, restrict_to_subset=False)
        # Table 3 (b): the general model's answer among the category's classes only
        restricted[index] = predict_shards(general_model, shards, workers=workers, classes=specialist.classes)
    routes = route(general.topk, classes, specialists, rule)
    ensemble = combine(general, predictions, routes, specialists)
    thresholds, source = mass_thresholds(general_model, shards, specialists, classes, workers, mass_threshold)
    mass_routes = route_by_mass(general.mass, thresholds)
    mass_ensemble = combine(general, predictions, mass_routes, specialists)
    rows = table3(general, ensemble, classes, specialists, routes, restricted, predictions,
                  mass_ensemble, mass_routes, thresholds)
    table2 = accuracy_table(ensemble, classes)
    markdown = table3_markdown(rows) + "\nPaired differences on the same images:\n\n" + differences_markdown(rows)

    out = RunStorage.at(out or find_run_dir(general_run))
    routed = {s.meta_category: int((routes == i).sum()) for i, s in enumerate(specialists)}
    routed_by_mass = {s.meta_category: int((mass_routes == i).sum()) for i, s in enumerate(specialists)}
    run_folder.write_json(out, run_folder.ENSEMBLE,
        {"rule": rule, "specialists": [storage.display(r) for r in specialist_runs], "routed": routed,
         "routed_by_mass": routed_by_mass, "mass_thresholds": thresholds, "threshold_source": source,
         "table3": rows, "table2": table2.to_dict()})
    out.write_text(run_folder.TABLE3, markdown + "\n")
    out.write_text(run_folder.ENSEMBLE_TABLE2, table2.to_markdown() + "\n")
    # every column of Table 3 can be recomputed from these files (global class ids)
    files = {run_folder.ENSEMBLE_PREDICTIONS: ensemble, run_folder.ENSEMBLE_MASS_PREDICTIONS: mass_ensemble,
             run_folder.ENSEMBLE_GENERAL_PREDICTIONS: general}
    for index, specialist in enumerate(specialists):
        inside = within_category(general, classes, specialist)
        for part, preds in (("specialist", predictions[index]), ("restricted", restricted[index])):
            name = run_folder.ensemble_category_predictions(specialist.meta_category, part)
            files[name] = in_global_classes(preds, specialist.classes, inside)
    for name, preds in files.items():
        preds.to_parquet(out.location(name), classes)
    return EnsembleResult(rows, general, ensemble, markdown, mass_ensemble, thresholds, source)
