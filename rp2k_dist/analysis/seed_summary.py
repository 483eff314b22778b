"""The demo's headline figures over seeds: one row per figure, its value in each seed's run
and the mean ± std, then the ensemble's gain pooled over the seeds.

Each seed's run is the general model's run folder of one ``rp2k demo --seed N`` (Table 2 in
``evaluation.json``, Table 3 in ``ensemble.json`` with its per-image predictions, the open set
in ``openset.json``). The seeds differ in ``run.seed`` only (initialisation, data order,
augmentation; the dataset is the same), so the std is the training's own spread, and the
bootstrap interval of one run is the test set's (:mod:`rp2k_dist.evaluation.stats`).

The ensemble's gain (d) - (a) over the seeds pairs, in every seed, the routed ensemble with
the general model on the same test images: its estimate is the mean of the seeds'
differences, its interval the test set's spread of that mean (images resampled with all
their seeds, within each class).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import run_folder
from ..storage import RunStorage
from ..evaluation.stats import Difference, format_mean_std, paired_difference_over_seeds

#: Table 3 columns summarised per specialist category: (label, key prefix in ensemble.json).
COLUMNS = (("(a) general", "general"), ("(c) specialist alone", "specialist"),
           ("(d) routed by top-1", "ensemble"), ("(e) routed by mass", "mass"))
#: The ensemble's gains pooled over seeds: (label, predictions of the ensemble column).
POOLED = (("(d)-(a)", "ensemble_predictions.parquet"), ("(e)-(a)", "ensemble_mass_predictions.parquet"))
GENERAL = "ensemble_general_predictions.parquet"


Location = str | Path  # a run folder: local, mounted, s3:// or gs://


def _json(run: Location, name: str) -> dict[str, Any]:
    folder = RunStorage.at(run)
    return json.loads(folder.read_bytes(name)) if folder.exists(name) else {}


def _exists(run: Location, name: str) -> bool:
    return RunStorage.at(run).exists(name)


def _predictions(run: Location, name: str) -> pd.DataFrame:
    return pd.read_parquet(BytesIO(RunStorage.at(run).read_bytes(name))).set_index("key")


def _number(value: Any) -> float:
    return float(value) if value is not None else math.nan


def headline(run: Location) -> dict[str, float]:
    """The figures of one run folder by name (nan where the run has no such figure)."""
    evaluation, ensemble, openset = (_json(run, name) for name in
                                     (run_folder.EVALUATION, run_folder.ENSEMBLE, run_folder.OPENSET))
    final = evaluation.get("final", {})
    figures = {"test top-1": final.get("val_top1"), "test top-5": final.get("val_top5"),
               "macro top-1 (per-class mean)": final.get("val_macro_top1")}
    for row in evaluation.get("table2", {}).get("by_type", []):
        figures[f"Table 2 top-1, {row['group']}"] = row["top1"]
    for row in ensemble.get("table3", []):
        for label, key in COLUMNS:
            figures[f"Table 3 top-1, {row['meta_category']} {label}"] = row.get(f"{key}_top1")
        for label in ("(d)-(a)",):
            figures[f"Table 3 {row['meta_category']} {label}, points"] = (row.get("differences") or {}).get(
                label, {}).get("estimate")
    rows = openset.get("rows") or []
    if rows:
        overall = rows[-1]
        figures.update({"open set AUROC (known vs unseen)": overall.get("auroc"),
                        "open set FAR @ TAR 95 %": overall.get("far")})
        for score in openset.get("scores") or []:  # every open-set score on the test-unseen classes
            figures[f"open set test AUROC, {score['score']}"] = score.get("auroc")
        recall = overall.get("recall") or {}
        for name in ("r@1 1-shot", "catalogue r@1 1-shot"):
            if name in recall:
                figures[f"open set {name}"] = recall[name]
        if overall.get("accuracy") is not None:
            figures["open set accuracy (right SKU or unknown)"] = overall["accuracy"]
    return {name: _number(value) for name, value in figures.items()}


def pooled_gains(runs: Sequence[Location]) -> dict[tuple[str, str], Difference]:
    """(meta-category, "(d)-(a)" or "(e)-(a)") -> the difference over the seeds' runs, on the
    test images every run predicted (:func:`~rp2k_dist.evaluation.stats.paired_difference_over_seeds`)."""
    gains = {}
    if not runs or not all(_exists(run, GENERAL) for run in runs):
        return gains
    general = [_predictions(run, GENERAL) for run in runs]
    categories = [row["meta_category"] for row in _json(runs[0], run_folder.ENSEMBLE).get("table3", [])]
    for label, name in POOLED:
        if not all(_exists(run, name) for run in runs):
            continue
        routed = [_predictions(run, name) for run in runs]
        shared = general[0].index
        for frame in [*general, *routed]:
            shared = shared.intersection(frame.index)
        for category in categories:
            inside = shared[(general[0].loc[shared, "type"] == category).to_numpy()]
            hits = [np.stack([frame.loc[inside, "correct_top1"].to_numpy(bool) for frame in frames])
                    for frames in (routed, general)]
            gains[(category, label)] = paired_difference_over_seeds(
                *hits, general[0].loc[inside, "true_class"].to_numpy(np.int64))
    return gains


def seed_gains(runs: Sequence[Location], category: str, label: str) -> list[float]:
    """The gain ``label`` on ``category`` in each seed's run, in points (Table 3's own)."""
    rows = [{r["meta_category"]: r for r in _json(run, run_folder.ENSEMBLE).get("table3", [])} for run in runs]
    return [_number(((row.get(category) or {}).get("differences") or {}).get(label, {}).get("estimate"))
            for row in rows]


def summary_markdown(runs: Sequence[Location], seeds: Sequence[int] | None = None) -> str:
    """Markdown: every headline figure per seed with its mean ± std, then the pooled gains."""
    seeds = list(seeds) if seeds is not None else list(range(len(runs)))
    figures = [headline(run) for run in runs]
    names = list(dict.fromkeys(name for figure in figures for name in figure))
    lines = ["| figure | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for name in names:
        values = [figure.get(name, math.nan) for figure in figures]
        digits = 3 if "AUROC" in name else 1
        cells = ["–" if math.isnan(v) else f"{v:.{digits}f}" for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {format_mean_std(values, digits)} |")
    gains = pooled_gains(runs)
    if gains:
        lines += ["", f"Ensemble gain over the general model, paired on the same test images, mean of "
                      f"{len(runs)} seeds (images resampled with all their seeds, within each class):", "",
                  "| meta-category | gain | test images | points, mean of seeds [95 % CI over test images] "
                  "| each seed | over seeds | verdict |", "|---|---|---:|---:|---|---:|---|"]
        for (category, label), difference in gains.items():
            each = seed_gains(runs, category, label)
            shown = ", ".join("–" if math.isnan(v) else f"{v:+.1f}" for v in each)
            lines.append(f"| {category} | {label} | {difference.n} | {difference.format()} | {shown} | "
                         f"{format_mean_std(each)} | {difference.verdict()} |")
        lines += ["", "The interval is the test set's spread of the mean over these seeds; the seeds' own "
                      "spread (\"over seeds\") is the training's. A gain holds when both point the same way."]
    return "\n".join(lines) + "\n"
