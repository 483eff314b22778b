"""``rp2k compare``: several runs side by side with the paper's Table 4 (technique by technique,
differences with intervals), in Markdown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import run_folder, storage
from ..evaluation.metrics import PAPER_TABLE4, format_percent
from .document import markdown_rows
from .run import Run



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
