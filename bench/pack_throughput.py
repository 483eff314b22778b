"""Packing throughput: ``pack_dataset`` at 1 and 2 worker processes against a naive repacker.

A synthetic RP2K (``quirks=False``, longer side ``--image-size`` px, like RP2K's ~550x680
photos at the default 640) is written to a temp dir, then packed repeatedly with
``PackConfig(shorter_side=320)`` into fresh output folders. Modes, interleaved per repeat:

* ``naive``: one process, for every image ``Image.open -> convert("RGB") -> resize
  (shorter side 320, bicubic) -> JPEG q90`` into memory: what a plain repacker does;
* ``encode_sample``: one process, the packer's per-image function alone (draft-mode
  decode + resize + encode; no tar, no checksums, no manifest);
* ``pack w=1`` / ``pack w=2``: the real :func:`pack_dataset` end to end (tar writing,
  sha256, fsync, manifest, process-pool start-up for w=2).

Printed: img/s, source MB/s read and shard MB/s written per mode, and the ratios
``pack w=2 / pack w=1``, ``pack w=1 / naive`` and ``encode_sample / naive`` (draft effect).

    .venv/bin/python bench/pack_throughput.py [--images-per-class 32] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from PIL import Image

from _common import (
    cpu_seconds, interleaved, machine_info, paired_ratio, print_machine, print_table, save_json,
    synthetic_tree, workdir,
)
from rp2k_dist.data import workers as worker_processes
from rp2k_dist.data.pack import PackConfig, encode_sample, pack_dataset
from rp2k_dist.data.rp2k import SPLITS, RP2KIndex, scan_rp2k


def naive_encode(path: Path, shorter_side: int, quality: int) -> bytes:
    """What a plain repacker does: full decode, bicubic resize, JPEG encode."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    scale = shorter_side / min(rgb.size)
    if scale < 1:
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=quality)
    return out.getvalue()


class PackBench:
    """The modes, each returning ``(img/s, extras)`` for one timed run."""

    def __init__(self, index: RP2KIndex, out_root: Path, config: PackConfig):
        self.index = index
        self.out_root = out_root
        self.config = config
        self.paths = [index.path(r) for split in SPLITS for r in index.records[split]]
        self.source_bytes = sum(p.stat().st_size for p in self.paths)
        self.runs = 0

    def _rate(self, start: tuple[float, float], images: int, out_bytes: int) -> tuple[float, dict[str, float]]:
        seconds, cpu = time.perf_counter() - start[0], cpu_seconds() - start[1]
        return images / seconds, {
            "seconds": seconds, "cpu_seconds": cpu, "images": images, "img_per_cpu_s": images / cpu,
            "in_mb_s": self.source_bytes / seconds / 1e6, "out_mb_s": out_bytes / seconds / 1e6,
        }

    @staticmethod
    def _start() -> tuple[float, float]:
        return time.perf_counter(), cpu_seconds()

    def naive(self) -> tuple[float, dict[str, float]]:
        start = self._start()
        out = sum(len(naive_encode(p, self.config.shorter_side, self.config.jpeg_quality)) for p in self.paths)
        return self._rate(start, len(self.paths), out)

    def encode_sample(self) -> tuple[float, dict[str, float]]:
        start = self._start()
        out = sum(len(encode_sample(p, self.config)) for p in self.paths)
        return self._rate(start, len(self.paths), out)

    def pack(self, workers: int) -> tuple[float, dict[str, float]]:
        self.runs += 1
        out = self.out_root / f"pack-{self.runs}"  # fresh folder: pack_dataset reuses finished ones
        config = replace(self.config, workers=workers)
        start = self._start()
        manifest = pack_dataset(self.index, out, config)
        result = self._rate(start, sum(manifest.num_samples(split) for split in SPLITS),
                            sum(s.bytes for split in SPLITS for s in manifest.shards(split)))
        shutil.rmtree(out)
        return result

    def pool_startup(self, workers: int = 2) -> float:
        """Seconds to start ``pack_dataset``'s kind of pool (forkserver) and get a trivial
        task back from every worker: the fixed cost inside ``pack workers=2``."""
        start = time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=worker_processes.worker_context()) as pool:
            list(pool.map(_touch, range(workers)))
        return time.perf_counter() - start


def _touch(_: int) -> int:
    import rp2k_dist.data.pack  # noqa: F401  (what a pack worker needs anyway)

    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=32, help="synthetic classes")
    parser.add_argument("--images-per-class", type=int, default=32, help="mean images per class")
    parser.add_argument("--image-size", type=int, default=640, help="longer side of the synthetic photos, px")
    parser.add_argument("--shorter-side", type=int, default=320, help="PackConfig.shorter_side")
    parser.add_argument("--samples-per-shard", type=int, default=64, help="small shards: enough of them for 2 workers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-preload", action="store_true",
                        help="start workers from a bare forkserver (no preloaded modules), as the packer did before")
    parser.add_argument("--workdir", help="keep the synthetic tree here and reuse it (default: temp dir, removed)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    info = machine_info()
    print_machine(info)
    if args.no_preload:  # must happen before the first pool starts the forkserver
        worker_processes.PRELOAD = ()
    with workdir(args.workdir, "bench-pack-") as work:
        tree = synthetic_tree(work / f"synth-{args.classes}x{args.images_per_class}-{args.image_size}",
                              args.classes, args.images_per_class, args.image_size)
        index = scan_rp2k(tree)
        config = PackConfig(shorter_side=args.shorter_side, samples_per_shard=args.samples_per_shard)
        (work / "out").mkdir(exist_ok=True)
        bench = PackBench(index, work / "out", config)
        print(f"{len(bench.paths)} images, {bench.source_bytes / 1e6:.1f} MB of source files; "
              f"{args.repeats} interleaved repeats", flush=True)
        series = interleaved({
            "naive (PIL, 1 proc)": bench.naive,
            "encode_sample (1 proc)": bench.encode_sample,
            "pack workers=1": lambda: bench.pack(1),
            "pack workers=2": lambda: bench.pack(2),
        }, args.repeats)
        startup = [bench.pool_startup(2) for _ in range(args.repeats)]

    rows = []
    for s in series.values():
        mid = sorted(range(len(s.rates)), key=lambda i: s.rates[i])[len(s.rates) // 2]
        per_cpu = statistics.median(e["img_per_cpu_s"] for e in s.extras)
        rows.append([s.name, s.median, s.extras[mid]["in_mb_s"], s.extras[mid]["out_mb_s"], per_cpu,
                     " ".join(f"{r:.0f}" for r in s.rates)])
    print()
    print_table(rows, ["mode", "img/s (median)", "src MB/s", "shard MB/s", "img/CPU-s", "img/s per repeat"])
    print(f"\nforkserver pool start-up, 2 workers (included in 'pack workers=2'): "
          f"median {statistics.median(startup):.2f} s ({', '.join(f'{t:.2f}' for t in startup)})")
    naive, enc, w1, w2 = series.values()
    ratios = {
        "pack_w2_over_w1": paired_ratio(w2, w1),
        "pack_w1_over_naive": paired_ratio(w1, naive),
        "encode_sample_over_naive": paired_ratio(enc, naive),
        "pack_w1_over_encode_sample": paired_ratio(w1, enc),
    }
    print("\nratios (median of per-repeat ratios):")
    for name, value in ratios.items():
        print(f"  {name:<28s} {value:.3f}")
    payload: dict[str, Any] = {
        "benchmark": "pack_throughput", "args": vars(args), "machine": info,
        "images": len(bench.paths), "source_mb": bench.source_bytes / 1e6,
        "modes": {s.name: {"median_img_s": s.median, "img_s": s.rates, "extras": s.extras} for s in series.values()},
        "ratios": ratios, "pool_startup_s": startup,
    }
    save_json(args.json, payload)


if __name__ == "__main__":
    main()
