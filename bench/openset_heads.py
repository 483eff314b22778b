"""Softmax head vs cosine (ArcFace) head on the same synthetic RP2K with unseen classes.

Both runs: the demo's recipe (``jobs/demo.yaml``: ResNet-34, AdamW, CBL beta 0.99,
``data.holdout`` 0.1) on one synthetic dataset, ``data.holdout_classes`` classes never
trained on, the same epochs and seed, trained in one process (the engine without Ray);
then ``rp2k openset`` on each. Prints both open-set tables (closed-set top-1/top-5, recall@1/@5
with 1- and 5-shot galleries of the unseen classes, AUROC, FAR at 95 % TAR).

  python bench/openset_heads.py                                # 48 classes, 48 px, 12 epochs
  python bench/openset_heads.py --classes 24 --per-class 24 --epochs 8 --crop 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from rp2k_dist.config import load_config
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.evaluation.openset import evaluate_openset
from rp2k_dist.storage import RunStorage

from _common import machine_info, print_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=48)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--crop", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--unseen", type=int, default=4, help="data.holdout_classes")
    parser.add_argument("--heads", default="softmax,cosine")
    parser.add_argument("--set", action="append", default=[], help="extra overrides for both runs")
    parser.add_argument("--out", help="working folder (default: a temporary one)")
    args = parser.parse_args()
    print_machine(machine_info())
    base = Path(args.out or tempfile.mkdtemp(prefix="openset-heads-"))
    summary = make_synthetic_rp2k(base / "rp2k", SynthConfig(classes=args.classes, images_per_class=args.per_class,
                                                             image_size=args.image_size))
    shards = base / "shards"
    pack_dataset(scan_rp2k(summary.root, summary.metadata_path), shards, PackConfig(shorter_side=64), overwrite=True)
    for head in args.heads.split(","):
        config = load_config("demo", [
            f"data.shards={shards}", f"run.storage_path={base / 'runs'}", f"run.name={head}", "run.workers=1",
            "data.batch_size=32", "data.loader_workers=1", f"model.crop_size={args.crop}",
            f"optim.epochs={args.epochs}", f"data.holdout_classes={args.unseen}", f"model.head={head}", *args.set])
        torch.manual_seed(0)
        start = time.perf_counter()
        final = train_worker(config, LocalContext(RunStorage(config.run.storage_path, config.run.name), "cpu"))
        trained = time.perf_counter() - start
        result = evaluate_openset(base / "runs" / head)
        print(f"\n## model.head={head}: {args.epochs} epochs in {trained:.0f} s, closed-set top-1 "
              f"{final['val_top1']:.1f} % top-5 {final['val_top5']:.1f} %; unseen: "
              f"{', '.join(c['name'] for c in result.unseen)}")
        print(result.to_markdown())
        print(f"threshold {result.threshold:.4f}: {result.threshold_source}", flush=True)


if __name__ == "__main__":
    main()
