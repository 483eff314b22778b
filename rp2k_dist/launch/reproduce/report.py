"""The report of ``rp2k reproduce``: ``reproduce.md`` and a self-contained ``reproduce.html``
in the storage path (local, mounted, s3://, gs://), beside the run folders.

Every table of the paper with the paper's numbers beside ours (Tables 2, 3, 4, the
Class-Balanced Loss ablation), the UMAP figure (Fig. 3) and the cost spent, built from the
public helpers of :mod:`rp2k_dist.analysis.report` and read from the run folders only: the
numbers are those of each run's ``evaluation.json`` and the general run's ``ensemble.json``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from ... import run_folder, storage
from ...analysis.compare import compare_runs, compare_table, paper_table4
from ...analysis.document import Document, markdown_rows
from ...analysis.run import REAL_RP2K_MIN_CLASSES, Run
from ...config import ExperimentConfig
from ...evaluation.table3_text import table3_markdown
from ...evaluation.metrics import PAPER_TABLE2, format_percent
from ...storage import RunStorage
from .graph import GENERAL, TABLE4, RunRecord


def hours(record: RunRecord) -> float:
    """A run's wall time in hours (nan until it has both ends)."""
    if record.started is None or record.finished is None:
        return math.nan
    return (record.finished - record.started) / 3600


def build_report(storage_path: str, records: Mapping[str, RunRecord], configs: Mapping[str, ExperimentConfig]) -> Document:
    """The report of the runs ``records`` under ``storage_path``; the UMAP figure is linked
    where it lies (``<general run>/umap.png``)."""
    root = RunStorage.at(storage_path)
    runs = {name: Run.read(root.location(name)) for name, r in records.items() if r.state == "finished"}
    manifest = next(iter(runs.values())).manifest() if runs else None
    real = manifest is not None and manifest.num_classes >= REAL_RP2K_MIN_CLASSES
    doc = Document("The paper reproduced")
    doc.para(f"Dataset: {manifest.num_classes if manifest else '?'} classes"
             + ("" if real else " (not RP2K's 2,388: the paper's numbers are shown for reference only)") + ".")

    doc.heading("Runs")
    rows = []
    for name, record in records.items():
        run = runs.get(name)
        train_s = sum(m.get("epoch_seconds", 0.0) for m in run.metrics) if run else math.nan
        rows.append([name, configs[name].model.name, record.state, f"{record.amount:g} {record.unit}",
                     f"{hours(record) * 60:.1f}", f"{train_s / 60:.1f}",
                     f"{hours(record) * record.amount:.2f} {record.unit}-h", record.error or record.note or ""])
    doc.table(markdown_rows(["run", "model", "state", "workers hold", "wall min", "train min", "cost", "note"],
                            rows, text_columns=4))
    spent = {unit: sum(hours(r) * r.amount for r in records.values() if r.unit == unit and r.state == "finished")
             for unit in sorted({r.unit for r in records.values()})}
    doc.para("Cost spent: " + ", ".join(f"{total:.2f} {unit}-hours" for unit, total in spent.items())
             + " (each finished run's wall time x the GPUs, or CPUs, its workers hold; 'train min' is the runs' "
             "own per-epoch timings summed).")

    doc.heading("Table 2: top-1 / top-5 per meta-category")
    for name in (GENERAL, "table2-inception-v3"):
        if name in runs and runs[name].table2 is not None:
            doc.heading(f"{name} ({runs[name].model})", 3)
            doc.table(runs[name].table2.to_markdown(PAPER_TABLE2.get(runs[name].model)))

    doc.heading("Table 3: general model and the routed ensemble, within the meta-category")
    ensemble = runs[GENERAL].ensemble if GENERAL in runs else None
    if ensemble:
        doc.table(table3_markdown(ensemble["table3"]))
    else:
        doc.para("Not evaluated (the general model or both specialists did not finish).")

    doc.heading("Table 4: from scratch / transfer learning, without / with augmentation")
    table4 = [runs[name] for name in TABLE4 if name in runs]
    if table4:
        doc.table(compare_table(table4))
        doc.heading("The paper's Table 4", 3)
        doc.table(paper_table4())
    else:
        doc.para("No Table 4 run finished.")

    doc.heading("Class-Balanced Loss ablation")
    cbl = [n for n in (GENERAL, "cbl-off") if n in runs]
    if cbl:
        doc.table(markdown_rows(["run", "CBL beta", "top-1", "top-5", "macro top-1"], [
            [n, f"{runs[n].config['loss']['cbl_beta']:g}", *(format_percent(runs[n].final()[k]) for k in ("top1", "top5", "macro"))]
            for n in cbl]))
    else:
        doc.para("No ablation run finished.")

    doc.heading("Fig. 3: UMAP of the general model's features")
    if GENERAL in runs and runs[GENERAL].folder.exists(run_folder.UMAP_PNG):
        doc.image(runs[GENERAL].folder.read_bytes(run_folder.UMAP_PNG), f"{GENERAL}/{run_folder.UMAP_PNG}", "UMAP")
    else:
        doc.para("Not drawn.")
    return doc


def write_report(storage_path: str, records: Mapping[str, RunRecord], configs: Mapping[str, ExperimentConfig]) -> tuple[str, str]:
    """``reproduce.md`` and ``reproduce.html`` (and ``table4.md``, the Table 4 runs compared)
    in the storage path; returns the locations of the two documents."""
    doc = build_report(storage_path, records, configs)
    table4 = [n for n in TABLE4 if n in records and records[n].state == "finished"]
    if table4:
        compare_runs([storage.join(storage_path, n) for n in table4], storage.join(storage_path, run_folder.TABLE4))
    # the figures it links are already in the storage path, where the runs wrote them
    return doc.write(storage_path, stem=run_folder.REPRODUCE, images=False)


def copy_report(storage_path: str, report_dir: str) -> list[str]:
    """Copy ``reproduce.md``, ``reproduce.html`` and the images the Markdown links from the
    storage path to ``report_dir`` (e.g. a laptop's folder after a run on the cluster);
    returns the names copied."""
    source, target = RunStorage.at(storage_path), RunStorage.at(report_dir)
    names = [f"{run_folder.REPRODUCE}.md", f"{run_folder.REPRODUCE}.html"]
    names += re.findall(r"!\[[^]]*\]\(([^)]+)\)", source.read_text(names[0]))
    for name in names:
        target.write_bytes(name, source.read_bytes(name))
    return names
