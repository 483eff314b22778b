"""Training-loader throughput at 224 px (ResNet-34's ``InputSpec(224, 256)``), batch 64.

On the same synthetic RP2K (``quirks=False``, longer side 640 px like RP2K's photos; the
train images hard-linked ``--replicate`` times so an epoch outlasts a measurement),
three loaders with the same number of worker processes:

* ``(a) torchvision``: ``ImageFolder`` on the original files + ``DataLoader(batch_size=64,
  shuffle=True, drop_last=True, persistent_workers=True)``, the paper's augmentations as
  standard torchvision v2 transforms on PIL (random border, random shrink-crop,
  RandomPerspective(0.2, p=0.5), ColorJitter(brightness=0.2), Resize(256),
  CenterCrop(224), PILToTensor -> uint8);
* ``(b) ShardLoader``: ours, ``TrainTransform(InputSpec(224, 256), AugmentConfig())`` on
  shards packed from the same tree with ``PackConfig(shorter_side=320)`` (packed once,
  not timed);
* ``(c) decode-only``: the same ShardLoader pipeline with a transform that only decodes
  the JPEG and takes a 224 crop (the upper bound of (b));
* ``(b0)``, only with ``--modes``: (b) with one augmentation generator per loader worker
  instead of one per sample (what per-sample seeding costs: (b)/(b0)).

Steady state: all three loaders stay alive (persistent workers, epochs chained with
``set_epoch``); each measurement first waits until the other loaders have stopped
working (their prefetch queues full), drains the batches this loader prefetched while
idle plus one batch per worker, then times ``--batches`` batches. Repeats are
interleaved (a b c, c b a, ...). Reported: median img/s, img per CPU second (all our
processes), and the ratios (b)/(a) and (b)/(c) as medians of per-repeat ratios.

    .venv/bin/python bench/loader_throughput.py [--batches 30] [--repeats 5] [--modes a,b,c] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from _common import (
    DecodeOnly, WorkerRngTrain, cpu_seconds, interleaved, machine_info, paired_ratio, print_machine, print_table,
    replicate_train, save_json, settle, synthetic_tree, torchvision_train_transform, workdir,
)
from rp2k_dist.config import DataConfig
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.transforms import InputSpec, TrainTransform

TARGETS = {"b_over_a": 1.5, "b_over_c": 0.70}
MODES = {"a": "(a) torchvision ImageFolder", "b": "(b) ShardLoader + TrainTransform",
         "c": "(c) ShardLoader decode-only", "b0": "(b0) (b), a generator per worker"}



def shard_batches(loader: ShardLoader) -> Iterator[torch.Tensor]:
    """Image batches of ``loader`` forever, one epoch after another."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            yield batch["image"]
        epoch += 1


def folder_batches(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Image batches of a torchvision DataLoader forever."""
    while True:
        for images, _ in loader:
            yield images


class Mode:
    """One loader kept alive between measurements."""

    def __init__(self, name: str, batches: Iterator[torch.Tensor], buffered: int):
        self.name = name
        self.batches = batches
        self.buffered = buffered  # batches its workers prefetch while we measure the others

    def warm_up(self, count: int, shape: tuple[int, ...]) -> None:
        for _ in range(count):
            images = next(self.batches)
        if tuple(images.shape) != shape or images.dtype != torch.uint8:
            raise RuntimeError(f"{self.name}: got {tuple(images.shape)} {images.dtype}, want {shape} uint8")

    def measure(self, batches: int, min_seconds: float, workers: int) -> tuple[float, dict[str, float]]:
        """Time at least ``batches`` batches and at least ``min_seconds``."""
        # The other loaders finish their prefetching first (settle); then drain what this
        # one prefetched while idle and let every worker finish one more batch: the timed
        # window starts with the queues empty, all workers busy and nobody else working.
        settle()
        for _ in range(self.buffered + workers):
            next(self.batches)
        start, cpu0 = time.perf_counter(), cpu_seconds()
        images = count = 0
        while count < batches or time.perf_counter() - start < min_seconds:
            images += next(self.batches).shape[0]
            count += 1
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
        return images / seconds, {"seconds": seconds, "images": images, "cpu_seconds": cpu,
                                  "img_per_cpu_s": images / cpu}


def build_modes(tree: Path, manifest: Manifest, args: argparse.Namespace) -> dict[str, Mode]:
    from torchvision.datasets import ImageFolder

    spec = InputSpec(args.crop, args.resize)
    config = LoaderConfig(DataConfig(batch_size=args.batch_size, loader_workers=args.workers))
    buffered = config.prefetch_factor * args.workers
    transforms = {"b": TrainTransform(spec, AugmentConfig()), "c": DecodeOnly(args.crop),
                  "b0": WorkerRngTrain(spec, AugmentConfig())}
    modes = {}
    for mode in args.modes:
        if mode == "a":
            folder = ImageFolder(str(tree / "all" / "train"), transform=torchvision_train_transform(args.crop, args.resize))
            tv_prefetch = 2  # DataLoader's default
            tv_loader = DataLoader(folder, batch_size=args.batch_size, num_workers=args.workers, shuffle=True,
                                   drop_last=True, persistent_workers=True, prefetch_factor=tv_prefetch)
            print(f"ImageFolder: {len(folder)} train images, {len(tv_loader)} batches/epoch", flush=True)
            modes[MODES[mode]] = Mode("(a)", folder_batches(tv_loader), tv_prefetch * args.workers)
        else:
            loader = ShardLoader(manifest, "train", transforms[mode], config)
            modes[MODES[mode]] = Mode(f"({mode})", shard_batches(loader), buffered)
    print(f"shards: {manifest.num_samples('train')} train samples, {manifest.num_samples('train') // args.batch_size} "
          "batches/epoch", flush=True)
    return modes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=32, help="synthetic classes")
    parser.add_argument("--images-per-class", type=int, default=25, help="mean images per class")
    parser.add_argument("--image-size", type=int, default=640, help="longer side of the synthetic photos, px")
    parser.add_argument("--replicate", type=int, default=3, help="hard-link copies of each train image")
    parser.add_argument("--shorter-side", type=int, default=320, help="PackConfig.shorter_side")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes (all modes)")
    parser.add_argument("--warmup", type=int, default=4, help="batches per loader before the first repeat")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per measurement")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="and at least this long")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep the tree and shards here and reuse them (default: temp dir, removed)")
    parser.add_argument("--modes", default="a,b,c", help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()
    args.modes = args.modes.split(",")
    if not set(args.modes) <= set(MODES) or len(set(args.modes)) != len(args.modes):
        parser.error(f"--modes: distinct names of {', '.join(MODES)}")

    torch.set_num_threads(1)
    info = machine_info()
    print_machine(info)
    with workdir(args.workdir, "bench-loader-") as work:
        tree = synthetic_tree(work / f"synth-{args.classes}x{args.images_per_class}-{args.image_size}",
                              args.classes, args.images_per_class, args.image_size)
        train_files = replicate_train(tree, args.replicate)
        out = work / f"shards-{args.classes}x{args.images_per_class}-{args.image_size}-x{args.replicate}-{args.shorter_side}"
        start = time.perf_counter()
        manifest = pack_dataset(scan_rp2k(tree), out, PackConfig(shorter_side=args.shorter_side, samples_per_shard=256))
        print(f"{train_files} train files; shards ready in {time.perf_counter() - start:.0f} s (not timed)", flush=True)
        modes = build_modes(tree, manifest, args)
        shape = (args.batch_size, 3, args.crop, args.crop)
        for mode in modes.values():
            start = time.perf_counter()
            mode.warm_up(args.warmup, shape)
            print(f"  {mode.name} started and warmed up in {time.perf_counter() - start:.1f} s", flush=True)
        series = interleaved({name: (lambda m=mode: m.measure(args.batches, args.min_seconds, args.workers))
                              for name, mode in modes.items()}, args.repeats)
        for mode in modes.values():  # stop the workers before the temp dir goes
            mode.batches.close()
        del modes
        gc.collect()

    by_mode = {mode: series[MODES[mode]] for mode in args.modes}
    rows = [[s.name, s.median, statistics.median(e["img_per_cpu_s"] for e in s.extras),
             " ".join(f"{r:.0f}" for r in s.rates)] for s in series.values()]
    print()
    print_table(rows, ["mode", "img/s (median)", "img/CPU-s", "img/s per repeat"])
    pairs = {f"b_over_{d}": (by_mode["b"], by_mode[d]) for d in ("a", "c", "b0") if "b" in by_mode and d in by_mode}
    ratios = {key: paired_ratio(num, den) for key, (num, den) in pairs.items()}
    cpu_ratios = {key: statistics.median(en["img_per_cpu_s"] / ed["img_per_cpu_s"] for en, ed in zip(num.extras, den.extras))
                  for key, (num, den) in pairs.items()}
    labels = {"b_over_a": "(b)/(a) ShardLoader vs torchvision", "b_over_c": "(b)/(c) ShardLoader vs decode-only",
              "b_over_b0": "(b)/(b0) per-sample vs per-worker rng"}
    print("\nratios (median of per-repeat ratios)        img/s   img/CPU-s   target")
    for key in pairs:
        target = TARGETS.get(key)
        verdict = "" if target is None else f">= {target:.2f} ({'met' if ratios[key] >= target else 'NOT met'})"
        print(f"  {labels[key]:<38s} {ratios[key]:8.3f}   {cpu_ratios[key]:8.3f}   {verdict}")
    save_json(args.json, {
        "benchmark": "loader_throughput", "args": vars(args), "machine": info, "train_files": train_files,
        "modes": {s.name: {"median_img_s": s.median, "img_s": s.rates, "extras": s.extras} for s in series.values()},
        "ratios": ratios, "ratios_per_cpu_s": cpu_ratios, "targets": TARGETS,
    })


if __name__ == "__main__":
    main()
