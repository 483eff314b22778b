"""Closed-set accuracy against open-set AUROC over the epochs of one run.

Vaze et al., "Open-Set Recognition: a Good Closed-Set Classifier is All You Need" (ICLR 2022):
across models and training stages, a classifier's open-set AUROC rises with its closed-set
accuracy. This script trains one run with the demo's recipe (``jobs/demo.yaml``, one process,
every epoch's checkpoint kept) on a synthetic RP2K with ``--unseen`` classes never trained on,
runs ``rp2k openset`` on each epoch's checkpoint, and prints, per epoch, the closed-set top-1
on the seen classes' test images (the run's ``metrics.jsonl``) and the test AUROC of each open-set score
(:mod:`rp2k_dist.evaluation.ood_scores`), with Pearson's r of top-1 and each score's AUROC over
the epochs; the figure (``--png``) plots AUROC against top-1, one line per score, each point
labelled by its epoch.

  python bench/openset_epochs.py --epochs 10 --out /tmp/os-epochs --png bench/openset_epochs.png
  python bench/openset_epochs.py --out /tmp/os-epochs --summarize --png bench/openset_epochs.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _common import machine_info, print_machine
from rp2k_dist.config import load_config
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.machine_speed import reference_line
from rp2k_dist.engine.train import train_worker
from rp2k_dist.evaluation.openset import evaluate_openset
from rp2k_dist.run_folder import checkpoint_dir
from rp2k_dist.storage import RunStorage


def plot(rows: list[dict], scores: list[str], png: Path) -> None:
    """AUROC (y) against closed-set top-1 (x), one line per score through the epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    top1 = [r["top1"] for r in rows]
    for i, score in enumerate(scores):
        ax.plot(top1, [r[score] for r in rows], marker="o", ms=4, lw=1.2, label=score, color=plt.cm.tab10(i))
    for r in rows:  # the epoch beside the first score's point
        ax.annotate(str(r["epoch"]), (r["top1"], r[scores[0]]), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
    ax.set_xlabel("closed-set top-1 on the seen classes' test images (%)")
    ax.set_ylabel("test AUROC, seen vs unseen test images")
    ax.set_title("Open-set AUROC against closed-set accuracy, epoch by epoch", fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def summarize(base: Path, png: Path | None) -> None:
    """The table, the correlations and the figure from a finished ``--out`` folder: each
    epoch's ``openset.json`` and the run's ``metrics.jsonl`` (``val_top1``: the classifier's
    test top-1 on the trained classes at that epoch)."""
    metrics = {m["epoch"]: m for m in (json.loads(line) for line in
                                       (base / "runs" / "epochs" / "metrics.jsonl").read_text().splitlines() if line)
               if "val_top1" in m}
    rows, scores, unseen = [], [], 0
    for folder in sorted((base / "openset").glob("epoch_*")):
        data = json.loads((folder / "openset.json").read_text())
        epoch = int(folder.name.split("_")[1])
        scores = [s["score"] for s in data["scores"]]
        chosen = data["chosen"] + (f" (k={data['chosen_k']})" if data["chosen"] == "knn" and data.get("chosen_k") else "")
        rows.append({"epoch": epoch, "top1": metrics[epoch]["val_top1"], "chosen": chosen,
                     **{s["score"]: s["auroc"] for s in data["scores"]}})
        unseen = data["rows"][-1]["unseen_test"]
    print(f"\n{unseen} test-unseen images; {len(data['test_unseen'])} test-unseen and "
          f"{len(data['validation_unseen'])} validation-unseen classes\n")
    print("| epoch | closed-set top-1 | " + " | ".join(f"AUROC {s}" for s in scores) + " | chosen on validation |")
    print("|---:|---:|" + "---:|" * len(scores) + "---|")
    for r in rows:
        print(f"| {r['epoch']} | {r['top1']:.1f} | " + " | ".join(f"{r[s]:.3f}" for s in scores) + f" | {r['chosen']} |")
    top1 = np.array([r["top1"] for r in rows])
    print("\nPearson's r of closed-set top-1 and AUROC over the epochs: " + ", ".join(
        f"{s} {np.corrcoef(top1, [r[s] for r in rows])[0, 1]:+.2f}" for s in scores))
    if png:
        plot(rows, scores, png)
        print(f"figure: {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=64)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--unseen", type=int, default=12, help="data.holdout_classes (half validation-unseen)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed")
    parser.add_argument("--set", action="append", default=[], help="extra overrides")
    parser.add_argument("--png", type=Path, help="write the figure here")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    parser.add_argument("--summarize", action="store_true", help="only the table and figure of a finished --out")
    args = parser.parse_args()
    if args.summarize:
        summarize(Path(args.out), args.png)
        return
    print_machine(machine_info())
    print(reference_line(), flush=True)
    base = Path(args.out or tempfile.mkdtemp(prefix="openset-epochs-"))
    summary = make_synthetic_rp2k(base / "rp2k", SynthConfig(classes=args.classes, images_per_class=args.per_class,
                                                             image_size=args.image_size))
    shards = base / "shards"
    pack_dataset(scan_rp2k(summary.root, summary.metadata_path), shards, PackConfig(shorter_side=64), overwrite=True)
    config = load_config("demo", [
        f"data.shards={shards}", f"run.storage_path={base / 'runs'}", "run.name=epochs", "run.workers=1",
        "data.batch_size=32", "data.loader_workers=1", f"model.crop_size={args.crop}", f"optim.epochs={args.epochs}",
        f"data.holdout_classes={args.unseen}", f"run.keep_checkpoints={args.epochs}", f"run.seed={args.seed}", *args.set])
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train_worker(config, LocalContext(RunStorage(config.run.storage_path, config.run.name), "cpu",
                                      keep=args.epochs))
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.0f} s", flush=True)
    for epoch in range(1, args.epochs + 1):
        result = evaluate_openset(base / "runs" / "epochs" / checkpoint_dir(epoch), shards,
                                  out=base / "openset" / checkpoint_dir(epoch))
        print(f"epoch {epoch}: " + ", ".join(f"{s['score']} {s['auroc']:.3f}" for s in result.scores)
              + f" (chosen: {result.chosen_label})", flush=True)
    summarize(base, args.png)
    print(reference_line())


if __name__ == "__main__":
    main()
