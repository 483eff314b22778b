"""Reports of trained runs: one run in Markdown + self-contained HTML (:func:`write_report`),
several runs side by side with the paper's Table 4 (:func:`compare_runs`).

A report reads only the run folder (``config.yaml``, ``metrics.jsonl``,
``evaluation.json``, ``predictions.parquet``, optional ``ensemble.json`` / ``table3.md`` /
``umap.png``) and, for example thumbnails, the shards named in its config. Run folders and
outputs are locations of :mod:`rp2k_dist.storage`: local, mounted, s3:// or gs://; figures
are drawn in memory and every file is written whole. The paper's
numbers are shown next to the run's only for runs on the real RP2K (a dataset of at least
:data:`REAL_RP2K_MIN_CLASSES` classes: RP2K has 2,388, the synthetic sets tens) with a
model the paper reports; otherwise the report says why they are left out.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .. import run_folder, storage
from ..data.manifest import Manifest, ManifestError
from ..evaluation.ensemble import table3_markdown, verdict
from ..evaluation.metrics import PAPER_TABLE2, PAPER_TABLE3, PAPER_TABLE4, AccuracyRow, AccuracyTable, format_percent
from ..errors import RunFolderError
from ..storage import RunStorage
from . import iter_shard_images
from .figures import MAX_VERTICAL_BARS, bar_chart_height, bar_panel, bars_shown, class_label, short
from .fonts import figure_text, readable_fonts

#: A dataset with at least this many classes is taken to be the real RP2K (2,388 classes).
REAL_RP2K_MIN_CLASSES = 2000
#: Confused pairs listed in the report, and how many of them get example thumbnails.
CONFUSED_PAIRS = 10
CONFUSED_THUMBNAILS = 5
DPI = 100


# -- reading a run folder -----------------------------------------------------------------


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


# -- figures --------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def png_bytes(figure: Any, path: str | Path | None = None) -> bytes:
    """A Matplotlib figure as PNG bytes, also written to ``path`` (a local path or a URI) if given."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png")
    data = buffer.getvalue()
    if path is not None:
        storage.write_bytes(path, data)
    return data


@readable_fonts
def plot_curves(metrics: list[dict[str, Any]], path: str | Path | None = None) -> bytes:
    """Training loss and top-1 (train, val; val top-5 dashed) per epoch, as PNG bytes
    (written to ``path`` too if given)."""
    from matplotlib.ticker import MaxNLocator

    figure = _figure(11, 4)
    loss_axes, accuracy_axes = figure.subplots(1, 2)

    def series(axes, key: str, label: str, style: str = "-o") -> None:
        points = [(m["epoch"], m[key]) for m in metrics if key in m]
        if points:
            axes.plot(*zip(*points), style, label=label, markersize=4)

    series(loss_axes, "train_loss", "train")
    series(accuracy_axes, "train_top1", "train top-1")
    series(accuracy_axes, "val_top1", "val top-1")
    series(accuracy_axes, "val_top5", "val top-5", "--s")
    loss_axes.set(title="training loss", xlabel="epoch", ylabel="loss")
    accuracy_axes.set(title="accuracy", xlabel="epoch", ylabel="%", ylim=(0, 100))
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        axes.legend()
    return png_bytes(figure, path)


@readable_fonts
def plot_categories(table: AccuracyTable, path: str | Path | None = None,
                    paper: dict[str, tuple[float, float]] | None = None) -> bytes:
    """Top-1 and top-5 per meta-category (type | shape), paper top-1 as black ticks, as PNG
    bytes (written to ``path`` too if given).
    Side by side for a few categories; for many, one horizontal sorted panel per system,
    stacked (:func:`rp2k_dist.analysis.figures.bar_panel`)."""
    systems = [("type", table.by_type), ("shape", table.by_shape)]
    shown = [bars_shown(rows, key=lambda r: (r.top1, r.top5)) for _, rows in systems]
    many = any(len(rows) > MAX_VERTICAL_BARS for rows, _ in shown)
    if many:
        heights = [bar_chart_height(len(rows)) for rows, _ in shown]
        figure = _figure(11, sum(heights))
        panels = figure.subplots(2, 1, gridspec_kw={"height_ratios": heights})
    else:
        figure = _figure(14, 4.5)
        panels = figure.subplots(1, 2)
    top1_paper = {k: v[0] for k, v in (paper or {}).items()}
    for axes, (system, all_rows), (rows, left_out) in zip(panels, systems, shown):
        # a name the fonts cannot draw: "<system> <its row in Table 2>"
        row_of = {r.group: i for i, r in enumerate(all_rows, 1)}
        bar_panel(axes, [r.group for r in rows], [r.samples for r in rows], [r.top1 for r in rows],
                  [r.top5 for r in rows], f"by {system}", paper=top1_paper, left_out=left_out,
                  names=[figure_text(r.group, f"{system} {row_of[r.group]}") for r in rows])
    return png_bytes(figure, path)


@readable_fonts
def confusion_examples(run: Run, manifest: Manifest, pairs: list[dict[str, Any]],
                       path: str | Path | None = None) -> bytes | None:
    """Per confused pair a misclassified test image of the true class and a test image of
    the predicted class, captioned with the classes' indices and names (:func:`pair_caption`),
    as PNG bytes (written to ``path`` too if given). None when no image can be shown."""
    predictions = pd.read_parquet(BytesIO(run.folder.read_bytes(run_folder.PREDICTIONS)),
                                  columns=["key", "true_class", "top5_classes", "correct_top1"])
    first = predictions["top5_classes"].map(lambda top: int(top[0]))
    cells = []
    for pair in pairs:
        wrong = predictions[(predictions["true_class"] == pair["true"]) & (first == pair["predicted"])]
        other = predictions[predictions["true_class"] == pair["predicted"]].sort_values("correct_top1", ascending=False)
        cells.append([
            (wrong["key"].iloc[0], f"true {pair_caption(pair, 'true', 32)}\n"
                                   f"predicted {pair_caption(pair, 'predicted', 27)}"),
            (other["key"].iloc[0], f"a test image of\n{pair_caption(pair, 'predicted', 32)}") if len(other) else None,
        ])
    keys = [cell[0] for row in cells for cell in row if cell]
    if not keys:
        return None
    images = dict(iter_shard_images(manifest, keys))
    from PIL import Image

    figure = _figure(5, 2.3 * len(cells))
    grid = np.atleast_2d(figure.subplots(len(cells), 2))
    for row, axes_row in zip(cells, grid):
        for cell, axes in zip(row, axes_row):
            axes.set_axis_off()
            if cell is None:
                axes.text(0.5, 0.5, "no test image of this class", ha="center", va="center", fontsize=8)
                continue
            key, caption = cell
            axes.imshow(Image.open(BytesIO(images[key])).convert("RGB"))
            axes.set_title(caption, fontsize=8)
    return png_bytes(figure, path)


def pair_label(pair: dict[str, Any], side: str) -> str:
    """A confused pair's ``side`` ("true" / "predicted") class by name: the product name
    when the metadata gave one, else the class folder name, else its index."""
    return class_label(pair.get(f"{side}_name") or f"#{pair[side]}", pair.get(f"{side}_product_name", ""))


def pair_caption(pair: dict[str, Any], side: str, limit: int) -> str:
    """``#<index> <name>`` of a confused pair's ``side`` class in a figure, the name cut to
    ``limit`` characters; where the fonts cannot draw the name, ``#<index> SKU <sku>``
    (or the index alone when the metadata has no SKU)."""
    sku = pair.get(f"{side}_sku", "")
    name = figure_text(pair_label(pair, side), f"SKU {sku}" if sku else "")
    return f"#{pair[side]} {short(name, limit)}".rstrip()


# -- Markdown + HTML ------------------------------------------------------------------------


def _inline(text: str) -> str:
    """Escaped HTML of one line of text with Markdown's **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_table_html(markdown: str) -> str:
    """An HTML table from a Markdown pipe table (header, alignment row, body rows)."""
    rows = [[cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            for line in markdown.strip().splitlines()]
    header, alignment, body = rows[0], rows[1], rows[2:]
    align = ["right" if a.endswith(":") else "left" for a in alignment]

    def cells(row: list[str], tag: str) -> str:
        return "".join(f'<{tag} style="text-align:{a}">{_inline(c)}</{tag}>' for c, a in zip(row, align))

    lines = [f"<tr>{cells(header, 'th')}</tr>"] + [f"<tr>{cells(row, 'td')}</tr>" for row in body]
    return "<table>\n" + "\n".join(lines) + "\n</table>"


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f3f3f3}
pre{background:#f6f6f6;padding:1em;overflow:auto}img{max-width:100%}code{background:#f3f3f3}"""


@dataclass
class Document:
    """A report written as Markdown (images linked) and HTML (images embedded) at once."""

    title: str
    md: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)  # PNGs by the name the Markdown links

    def __post_init__(self) -> None:
        self.md.append(f"# {self.title}\n")
        self.html.append(f"<h1>{html.escape(self.title)}</h1>")

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{_inline(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{_inline(text)}</p>")

    def table(self, markdown: str) -> None:
        self.md.append(markdown.strip() + "\n")
        self.html.append(markdown_table_html(markdown))

    def code(self, text: str, language: str = "") -> None:
        self.md.append(f"```{language}\n{text.rstrip()}\n```\n")
        self.html.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")

    def image(self, png: bytes, name: str, alt: str) -> None:
        """A PNG: linked as ``name`` (a path relative to the document) in the Markdown,
        embedded in the HTML; :meth:`write` puts the file at ``name``."""
        self.images[name] = png
        self.md.append(f"![{alt}]({name})\n")
        data = base64.b64encode(png).decode("ascii")
        self.html.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>')

    def markdown(self) -> str:
        return "\n".join(self.md)

    def page(self) -> str:
        """The self-contained HTML page (styles and images inline, no scripts, no links)."""
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(self.title)}</title>'
                f"<style>{_STYLE}</style></head>\n<body>\n" + "\n".join(self.html) + "\n</body></html>\n")

    def write(self, out_dir: str | Path, stem: str = run_folder.REPORT, images: bool = True) -> tuple[str, str]:
        """Write ``<stem>.md``, ``<stem>.html`` and (``images``) the PNGs the Markdown links
        into the folder ``out_dir`` (local or a URI); returns the two documents' locations."""
        folder = RunStorage.at(out_dir)
        for name, png in self.images.items() if images else ():
            folder.write_bytes(name, png)
        folder.write_text(f"{stem}.md", self.markdown())
        folder.write_text(f"{stem}.html", self.page())
        return folder.location(f"{stem}.md"), folder.location(f"{stem}.html")


def markdown_rows(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    """A Markdown pipe table: the first ``text_columns`` columns left-aligned, the rest
    (numbers) right-aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    alignment = "|" + "---|" * text_columns + "---:|" * (len(header) - text_columns)
    return "\n".join([line(header), alignment] + [line(r) for r in rows]) + "\n"


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


# -- several runs (Table 4) -----------------------------------------------------------------


def table4_technique(pretrained: bool, augmented: bool) -> str:
    """The row name of the paper's Table 4 for this kind of ResNet-34 run."""
    if not augmented:
        return "transfer learning (ImageNet)" if pretrained else "from scratch"
    return f"{'transfer learning' if pretrained else 'from scratch'} + augmentation"


def _augmented(config: dict[str, Any]) -> bool:
    augment = config["augment"]
    return any(augment[key] for key in ("border", "crop", "perspective", "brightness"))


def compare_table(runs: list[Run]) -> str:
    """Runs side by side as a Markdown table: model, initialisation, augmentation, Table 4
    technique, CBL beta, epochs, top-1 with its 95 % interval, top-5, macro top-1 and, for
    ResNet-34 runs on the real RP2K, the paper's Table 4 numbers for the technique. Runs of
    one preset over seeds (``<name>-s<i>``) are followed by their mean ± std."""
    from .seeds import aggregate, group_runs

    rows = []
    finals = [run.final() for run in runs]
    for run, final in zip(runs, finals):
        model = run.config["model"]
        start = model["pretrained"] or (f"weights {storage.basename(model['weights'])}" if model["weights"] else "scratch")
        technique = table4_technique(start != "scratch", _augmented(run.config))
        paper = PAPER_TABLE4.get(technique) if run.model == "resnet34" and run.is_real_rp2k(run.manifest()) else None
        epochs = run.metrics[-1]["epoch"] if run.metrics else 0
        table = run.table2
        interval = table.overall.interval(1) if table is not None else None
        rows.append([
            run.name, run.model, start, "on" if _augmented(run.config) else "off", technique,
            f"{run.config['loss']['cbl_beta']:g}", f"{epochs} of {run.config['optim']['epochs']}",
            format_percent(final["top1"]), "–" if interval is None else interval.bounds, format_percent(final["top5"]),
            format_percent(final["macro"]),
            format_percent(paper[0] if paper else None), format_percent(paper[1] if paper else None),
        ])
    for group, members in group_runs([run.name for run in runs]).items():
        if len(members) > 1:
            rows.append([f"**{group}** (mean ± std)", runs[members[0]].model, "", "", "", "", "",
                         aggregate([finals[i]["top1"] for i in members]), "",
                         aggregate([finals[i]["top5"] for i in members]),
                         aggregate([finals[i]["macro"] for i in members]), "", ""])
    header = ["run", "model", "init", "augmentation", "Table 4 technique", "CBL beta", "epochs", "top-1",
              "top-1 95 % CI", "top-5", "macro top-1", "paper top-1", "paper top-5"]
    return markdown_rows(header, rows, text_columns=5)


def compare_differences(runs: list[Run]) -> list[str]:
    """One sentence per group after the first: its top-1 minus the first group's, paired on
    the same test images (pooled over seeds), "helped"/"hurt" only when the interval
    excludes 0."""
    from .seeds import group_runs, paired_comparison

    groups = list(group_runs([run.name for run in runs]).items())
    if len(groups) < 2:
        return []
    (base, base_members), sentences = groups[0], []
    for group, members in groups[1:]:
        comparison = paired_comparison([runs[i] for i in members], [runs[i] for i in base_members], group, base)
        if comparison is not None:
            sentences.append(comparison.sentence())
    return sentences


def paper_table4() -> str:
    """The paper's Table 4 (ResNet-34: technique, top-1, top-5) as a Markdown table."""
    return markdown_rows(
        ["technique (paper, ResNet-34)", "top-1", "top-5"],
        [[name, format_percent(top1), format_percent(top5)] for name, (top1, top5) in PAPER_TABLE4.items()],
    )


def compare_runs(run_dirs: list[str | Path], out: str | Path) -> str:
    """Runs side by side (:func:`compare_table`), then the paper's Table 4. ``out``: a
    ``.md`` file or a folder (``compare.md``), local or a URI; returns where it went."""
    out = str(out)
    location = out if storage.basename(out).endswith(".md") else storage.join(out, run_folder.COMPARE)
    runs = [Run.read(run_dir) for run_dir in run_dirs]
    differences = compare_differences(runs)
    text = (
        "# Runs compared\n\n"
        "Test-set accuracy in percent (top-1/top-5: all test images; macro: mean of per-class top-1; the "
        "interval: 95 % bootstrap over test images, within each class). Runs named `<name>-s<i>` are seeds of "
        "one preset, summarised as mean ± std. Paper columns only for ResNet-34 runs on the real RP2K.\n\n"
        + compare_table(runs)
        + ("\n## Paired differences\n\n" + "\n".join(f"- {line}" for line in differences) + "\n"
           if differences else "")
        + "\n## Reference: the paper's Table 4\n\n" + paper_table4()
    )
    storage.write_text(location, text)
    return location
