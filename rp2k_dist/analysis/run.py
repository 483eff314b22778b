"""A trained run as the reports read it (:class:`Run`): its config, metrics, evaluation,
predictions and manifest, from a run folder of :mod:`rp2k_dist.storage` (local, s3://, gs://)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .. import run_folder, storage
from ..data.manifest import Manifest, ManifestError
from ..evaluation.metrics import PAPER_TABLE2, AccuracyRow, AccuracyTable
from ..errors import RunFolderError
from ..storage import RunStorage


#: A dataset with at least this many classes is taken to be the real RP2K (2,388 classes).
REAL_RP2K_MIN_CLASSES = 2000



def table_from_dict(data: dict[str, Any]) -> AccuracyTable:
    """Rebuild an :class:`AccuracyTable` from :meth:`AccuracyTable.to_dict`."""
    return AccuracyTable(
        by_type=[AccuracyRow(**row) for row in data["by_type"]],
        by_shape=[AccuracyRow(**row) for row in data["by_shape"]],
        overall=AccuracyRow(**data["overall"]),
        macro=AccuracyRow(**data["macro"]),
    )


@dataclass
class Run:
    """The artefacts of one run folder."""

    folder: RunStorage
    config: dict[str, Any]
    metrics: list[dict[str, Any]]  # one per finished epoch
    evaluation: dict[str, Any] | None  # evaluation.json (after the last epoch)
    ensemble: dict[str, Any] | None  # ensemble.json (after `evaluate_ensemble`)

    @classmethod
    def read(cls, run_dir: str | Path) -> "Run":
        """The run folder at ``run_dir`` (a local path or a URI)."""
        folder = RunStorage.at(run_dir)
        if not folder.exists(run_folder.CONFIG):
            raise RunFolderError(f"{storage.display(folder.uri)} is not a run folder (no {run_folder.CONFIG})",
                                 hint="give the folder `rp2k train` printed (<run.storage_path>/<run.name>)")
        config = yaml.safe_load(folder.read_text(run_folder.CONFIG))
        return cls(folder, config, run_folder.read_metrics(folder), run_folder.read_json(folder, run_folder.EVALUATION),
                   run_folder.read_json(folder, run_folder.ENSEMBLE))

    @property
    def location(self) -> str:
        return self.folder.uri

    @property
    def name(self) -> str:
        return self.config["run"]["name"]

    @property
    def model(self) -> str:
        return self.config["model"]["name"]

    @property
    def table2(self) -> AccuracyTable | None:
        return table_from_dict(self.evaluation["table2"]) if self.evaluation else None

    def final(self) -> dict[str, float]:
        """Top-1, top-5 and macro top-1 (percent) of the last evaluation; nan if none."""
        table = self.table2
        if table is not None:
            return {"top1": table.overall.top1, "top5": table.overall.top5, "macro": table.macro.top1}
        evaluated = [m for m in self.metrics if "val_top1" in m]
        last = evaluated[-1] if evaluated else {}
        return {"top1": last.get("val_top1", np.nan), "top5": last.get("val_top5", np.nan),
                "macro": last.get("val_macro_top1", np.nan)}

    def manifest(self) -> Manifest | None:
        """The run's packed dataset, when its folder is reachable from here."""
        try:
            return Manifest.load(self.config["data"]["shards"])
        except ManifestError:
            return None

    def paper_table2(self, manifest: Manifest | None) -> tuple[dict[str, tuple[float, float]] | None, str]:
        """The paper's Table 2 column for this run, or None, and a sentence saying which."""
        if manifest is None:
            return None, "The run's dataset is not reachable from here, so the paper's numbers are not shown."
        if not self.is_real_rp2k(manifest):
            return None, (f"The dataset has {manifest.num_classes} classes, not RP2K's 2,388 (a synthetic or "
                          "reduced set), so the paper's numbers are not shown: they would not be comparable.")
        if self.config["data"]["meta_category"]:
            return None, "A specialist run (one meta-category): the paper's Table 2 does not apply."
        if self.model not in PAPER_TABLE2:
            return None, f"The paper's Table 2 has no {self.model} column."
        return PAPER_TABLE2[self.model], f"Paper columns: the paper's Table 2, {self.model}."

    def is_real_rp2k(self, manifest: Manifest | None) -> bool:
        return manifest is not None and manifest.num_classes >= REAL_RP2K_MIN_CLASSES
