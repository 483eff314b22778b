"""The report of a trained run: Markdown + self-contained HTML (:func:`write_report`): its
Tables 2 and 3, the open-set section, curves, categories and confused pairs. Several runs side by
side with the paper's Table 4 are :mod:`.compare`'s (:func:`~.compare.compare_runs`); the run
folder is read by :mod:`.run`, figures drawn by :mod:`.plots`, the HTML built by :mod:`.document`.

A report reads only the run folder (``config.yaml``, ``metrics.jsonl``,
``evaluation.json``, ``predictions.parquet``, optional ``ensemble.json`` / ``table3.md`` /
``umap.png``) and, for example thumbnails, the shards named in its config. Run folders and
outputs are locations of :mod:`rp2k_dist.storage`: local, mounted, s3:// or gs://; figures
are drawn in memory and every file is written whole. The paper's
numbers are shown next to the run's only for runs on the real RP2K (a dataset of at least
:data:`~.run.REAL_RP2K_MIN_CLASSES` classes: RP2K has 2,388, the synthetic sets tens) with a
model the paper reports; otherwise the report says why they are left out.
"""

from __future__ import annotations

from pathlib import Path

from .. import run_folder, storage
from ..evaluation.table3_text import table3_markdown, verdict
from ..evaluation.metrics import PAPER_TABLE3, format_percent
from .document import Document, markdown_rows
from .plots import confusion_examples, pair_label, plot_categories, plot_curves
from .run import Run, table_from_dict


#: Confused pairs listed in the report, and how many of them get example thumbnails.
CONFUSED_PAIRS = 10
CONFUSED_THUMBNAILS = 5


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> tuple[str, str]:
    """Write ``report.md`` and ``report.html`` (plus the PNGs the Markdown links) into
    ``out_dir`` (default ``<run>/report``; local or a URI); returns their locations."""
    run = Run.read(run_dir)
    out = str(out_dir) if out_dir else run.folder.location(run_folder.REPORT_DIR)
    manifest = run.manifest()
    doc = Document(f"Run {run.name}: {run.model}")

    doc.heading("Summary")
    final = run.final()
    epochs = run.metrics[-1]["epoch"] if run.metrics else 0
    seconds = sum(m.get("epoch_seconds", 0.0) for m in run.metrics)
    speeds = [m["images_per_second"] for m in run.metrics if "images_per_second" in m]
    doc.table(markdown_rows(
        ["run", "model", "epochs", "test top-1 %", "test top-5 %", "macro top-1 %", "throughput (img/s, last epoch)",
         "training time (sum of epoch_seconds)"],
        [[run.name, run.model, f"{epochs} of {run.config['optim']['epochs']}", format_percent(final["top1"]),
          format_percent(final["top5"]), format_percent(final["macro"]), f"{speeds[-1]:.1f}" if speeds else "–",
          f"{seconds:.1f} s ({seconds / 3600:.2f} h)"]],
        text_columns=2,
    ))
    doc.para(f"Run folder: `{storage.display(run.location)}`. Dataset: `{storage.display(run.config['data']['shards'])}`"
             + (f" ({manifest.num_classes} classes)." if manifest else " (not reachable from here)."))

    doc.heading("Table 2: accuracy per meta-category")
    table = run.table2
    paper, why = run.paper_table2(manifest)
    if table is None:
        doc.para("No `evaluation.json`: the run has not finished its last epoch.")
    else:
        doc.para(why)
        doc.table(table.to_markdown(paper=paper))
        doc.image(plot_categories(table, paper=paper), run_folder.CATEGORIES_PNG, "top-1 and top-5 per meta-category")

    if run.ensemble or run.folder.exists(run_folder.TABLE3):
        doc.heading("Table 3: general model vs ensemble, within the meta-category")
        doc.para("On each category's test images, top-1 / top-5 in %: (a) the general model among all classes, "
                 "(b) the general model among the category's classes only (perfect routing, no specialist), "
                 "(c) the specialist alone, (d) the ensemble routed by the general model's top-1 class, (e) the "
                 "ensemble routed by the general model's probability mass on the category; per routing rule, "
                 "recall: the share of the category's images sent to its specialist, precision: the share of the "
                 "category's images among those sent to it.")
        if run.ensemble:
            real = run.is_real_rp2k(manifest)
            routed = ", ".join(f"{n} to {category}" for category, n in run.ensemble.get("routed", {}).items())
            reference = "Paper columns: the paper's Table 3." if real else "Paper columns left out (not the real RP2K)."
            routing = f"Routing rule of (d) `{run.ensemble.get('rule', 'top1')}`"
            mass = (f"(e) thresholds {', '.join(f'{t:.3f}' for t in run.ensemble['mass_thresholds'])}: "
                    f"{run.ensemble.get('threshold_source', '')}. ") if run.ensemble.get("mass_thresholds") else ""
            doc.para(routing + (f" (test images routed: {routed}). " if routed else ". ") + mass + reference)
            doc.table(table3_markdown(run.ensemble["table3"], paper=PAPER_TABLE3 if real else None))
            doc.para(verdict(run.ensemble["table3"]))
            doc.heading("Table 2 of the ensemble", 3)
            doc.table(table_from_dict(run.ensemble["table2"]).to_markdown())
        else:
            doc.table(run.folder.read_text(run_folder.TABLE3))

    openset = run_folder.read_json(run.folder, run_folder.OPENSET)
    if openset is not None:
        from ..evaluation.openset import report_parts

        doc.heading("Open set: products the model never trained on")
        for kind, text in report_parts(openset):
            getattr(doc, kind)(text)

    if run.metrics:
        doc.heading("Training curves")
        doc.image(plot_curves(run.metrics), run_folder.CURVES_PNG, "training loss and accuracy per epoch")

    pairs = (run.evaluation or {}).get("confused_pairs", [])[:CONFUSED_PAIRS]
    doc.heading("Most confused pairs")
    if not pairs:
        doc.para("No confusions recorded (no `evaluation.json`, or every test image right).")
    else:
        doc.table(markdown_rows(
            ["true class", "predicted as", "count", "share of the true class's test images"],
            [[f"#{p['true']} {pair_label(p, 'true')}", f"#{p['predicted']} {pair_label(p, 'predicted')}", str(p["count"]),
              f"{100 * p['share_of_true']:.1f} %"] for p in pairs],
            text_columns=2,
        ))
        examples = None
        if manifest is not None:
            examples = confusion_examples(run, manifest, pairs[:CONFUSED_THUMBNAILS])
        if examples:
            doc.image(examples, run_folder.CONFUSIONS_PNG, "examples of the most confused pairs")
        else:
            doc.para("Example images left out: the run's shards are not reachable from here.")

    if run.folder.exists(run_folder.UMAP_PNG):
        doc.heading("UMAP of the features (the paper's Fig. 3)")
        doc.image(run.folder.read_bytes(run_folder.UMAP_PNG), run_folder.UMAP_PNG,
                  "UMAP of penultimate features coloured by type and shape")

    doc.heading("Configuration")
    doc.code(run.folder.read_text(run_folder.CONFIG), "yaml")
    return doc.write(out)
