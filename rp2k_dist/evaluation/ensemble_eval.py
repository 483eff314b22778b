"""Evaluate the paper's ensemble (Table 3) from trained runs.

A general model's run plus one API-Net specialist run per meta-category (trained with
``data.meta_category: type=liquor`` etc.) -> routed ensemble predictions on the test split,
Table 3 (within-category accuracy: general, general among the category's classes,
specialist alone, routed ensemble; routing recall) and the ensemble's Table 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import run_folder, storage
from ..config import parse_meta_category
from ..data.manifest import Manifest
from ..run_folder import find_run_dir
from ..storage import RunStorage
from ..errors import CheckpointError
from .ensemble import Specialist, combine, in_global_classes, route, table3, table3_markdown, within_category
from .inference import load_trained, predict_shards
from .metrics import accuracy_table
from .predictions import Predictions


@dataclass
class EnsembleResult:
    table3: list[dict[str, Any]]
    general: Predictions
    ensemble: Predictions
    markdown: str


def specialist_of(trained) -> Specialist:
    """The Specialist (meta-category and global classes) a specialist checkpoint was trained on."""
    category = trained.checkpoint["config"]["data"]["meta_category"]
    if not category or trained.class_subset is None:
        raise CheckpointError(f"checkpoint of {trained.name} was not trained on one meta-category (data.meta_category)",
                              hint="pass a specialist's run folder to --specialist")
    system, value = parse_meta_category(category)
    return Specialist(value, system, tuple(trained.class_subset))


def evaluate_ensemble(
    general_run: str | Path, specialist_runs: list[str | Path], shards: str | Path | None = None,
    out: str | Path | None = None, rule: str = "top1", workers: int = 2,
) -> EnsembleResult:
    """Route every test image (general model's top-1 meta-category) and score the ensemble.

    Writes ``ensemble.json``, ``table3.md``, ``ensemble_table2.md`` and the predictions
    behind every Table 3 column into ``out`` (default: the general run's folder; run
    folders and ``out`` may be local, mounted or in object storage):
    ``ensemble_predictions.parquet`` (d), ``ensemble_general_predictions.parquet`` (a, and
    the routing), and per category ``ensemble_<category>_restricted.parquet`` (b) and
    ``ensemble_<category>_specialist.parquet`` (c), all in global class ids.
    """
    general_model = load_trained(general_run)
    if general_model.class_subset is not None:
        raise CheckpointError("the general model must be trained on all classes (no data.meta_category)",
                              hint="pass the general ResNet-34's run folder first, specialists with --specialist")
    shards = str(shards or general_model.checkpoint["config"]["data"]["shards"])
    classes = Manifest.load(shards).classes
    general = predict_shards(general_model, shards, workers=workers)
    specialists, predictions, restricted = [], {}, {}
    for index, run in enumerate(specialist_runs):
        trained = load_trained(run)
        specialist = specialist_of(trained)
        specialists.append(specialist)
        # every test image: the ones routed here are then picked by key
        predictions[index] = predict_shards(trained, shards, workers=workers, restrict_to_subset=False)
        # Table 3 (b): the general model's answer among the category's classes only
        restricted[index] = predict_shards(general_model, shards, workers=workers, classes=specialist.classes)
    routes = route(general.topk, classes, specialists, rule)
    ensemble = combine(general, predictions, routes, specialists)
    rows = table3(general, ensemble, classes, specialists, routes, restricted, predictions)
    table2 = accuracy_table(ensemble, classes)
    markdown = table3_markdown(rows)

    out = RunStorage.at(out or find_run_dir(general_run))
    routed = {s.meta_category: int((routes == i).sum()) for i, s in enumerate(specialists)}
    run_folder.write_json(out, run_folder.ENSEMBLE,
        {"rule": rule, "specialists": [storage.display(r) for r in specialist_runs], "routed": routed,
         "table3": rows, "table2": table2.to_dict()})
    out.write_text(run_folder.TABLE3, markdown + "\n")
    out.write_text(run_folder.ENSEMBLE_TABLE2, table2.to_markdown() + "\n")
    # every column of Table 3 can be recomputed from these files (global class ids)
    files = {run_folder.ENSEMBLE_PREDICTIONS: ensemble, run_folder.ENSEMBLE_GENERAL_PREDICTIONS: general}
    for index, specialist in enumerate(specialists):
        inside = within_category(general, classes, specialist)
        for part, preds in (("specialist", predictions[index]), ("restricted", restricted[index])):
            name = run_folder.ensemble_category_predictions(specialist.meta_category, part)
            files[name] = in_global_classes(preds, specialist.classes, inside)
    for name, preds in files.items():
        preds.to_parquet(out.location(name), classes)
    return EnsembleResult(rows, general, ensemble, markdown)


