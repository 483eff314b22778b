"""The data plane at cluster scale: read amplification, bytes actually read, S3 vs local disk.

1. **Planned read amplification** (pure planning, no I/O): bytes the epoch's plan reads
   over all readers (``world x max(1, loader workers)``) divided by the split's bytes, for
   world sizes 1..64 x loader workers {0, 2, 8} x {1, 60, 1000} shards of an RP2K-sized
   train split (~300k samples of ~45 KB: 60 shards is what the packer's default 256 MB
   gives for real RP2K). Next to it, the same figure for the shard-level deal this
   loader used before (``shards[rank::world]``, or every reader walking all shards and
   keeping its residue class when there are too few or too uneven shards), re-computed
   here from that rule. Also the time to plan one rank's epoch at 64 x 8.
2. **Bytes actually read** (counted in the storage layer, summed over the ranks' loader
   workers) for one training epoch at world 3 x 2 workers, from local disk and from a
   SeaweedFS S3 server on loopback, over a small synthetic pack.
3. **Loader img/s, local disk vs S3**: one full training epoch per measurement (persistent
   workers), interleaved (local, S3, S3, local, ...), with ``RawJpeg`` (workers only read
   tar members: the read path alone, as with GPU decoding) and with the full CPU
   ``TrainTransform`` at 224 px. Ratios S3 / local are medians of per-repeat ratios.

    .venv/bin/python bench/loader_scale.py [--repeats 5] [--workers 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.s3server

from _common import interleaved, machine_info, paired_ratio, print_machine, print_table, replicate_train, save_json, synthetic_tree, workdir  # noqa: E402
from rp2k_dist import storage  # noqa: E402
from rp2k_dist.config import AugmentConfig, DataConfig  # noqa: E402
from rp2k_dist.data.chunks import SampleTable, plan_epoch, plan_training_epoch  # noqa: E402
from rp2k_dist.data.loader import LoaderConfig, ShardLoader  # noqa: E402
from rp2k_dist.data.manifest import Manifest  # noqa: E402
from rp2k_dist.data.pack import PackConfig, pack_dataset  # noqa: E402
from rp2k_dist.data.rp2k import scan_rp2k  # noqa: E402
from rp2k_dist.data.transforms import InputSpec, RawJpeg, TrainTransform  # noqa: E402

WORLDS = (1, 2, 4, 8, 16, 32, 64)
WORKERS = (0, 2, 8)
SHARDS = (1, 60, 1000)
RP2K_TRAIN = 300_000
SAMPLE_BYTES = (30_000, 60_000)


def rp2k_like_table(shards: int, seed: int = 0) -> SampleTable:
    """An RP2K-sized split cut into ``shards`` shards, tar-like byte ranges (no files)."""
    rng = np.random.default_rng(seed)
    per = np.diff((np.arange(shards + 1) * RP2K_TRAIN) // shards)
    sizes = rng.integers(*SAMPLE_BYTES, RP2K_TRAIN) // 512 * 512
    shard = np.repeat(np.arange(shards), per)
    starts = np.concatenate([[0], np.cumsum(per)[:-1]])
    offset = np.cumsum(sizes) - sizes
    offset = offset - np.repeat(offset[starts], per)
    return SampleTable([f"s{i}" for i in range(shards)], shard, offset, sizes)


def shard_deal_amplification(table: SampleTable, world: int, workers: int) -> float:
    """Bytes read / split bytes under the shard-level deal with its sample-level fallback."""
    counts = np.bincount(table.shard, minlength=len(table.shards))
    sizes = np.bincount(table.shard, weights=table.length, minlength=len(table.shards))
    shards = list(range(len(table.shards)))

    def deal(items: list[int], parts: int) -> list[list[int]] | None:
        if len(items) < parts:
            return None
        groups = [items[p::parts] for p in range(parts)]
        totals = [counts[g].sum() for g in groups]
        return groups if min(totals) >= 0.75 * sum(totals) / parts else None

    readers = max(1, workers)
    per_rank = deal(shards, world)
    if per_rank is None:  # every reader walks every shard
        return float(world * readers)
    read = 0.0
    for mine in per_rank:
        split = deal(mine, readers)
        read += sizes[mine].sum() * (readers if split is None else 1)
    return read / sizes.sum()


def planned_amplification() -> list[list]:
    rows = []
    for shards in SHARDS:
        table = rp2k_like_table(shards, seed=shards)
        for workers in WORKERS:
            for world in WORLDS:
                planned = sum(p.bytes for p in plan_epoch(table, world, workers, epoch=1))
                rows.append([shards, workers, world, planned / table.bytes,
                             shard_deal_amplification(table, world, workers)])
    return rows


def planning_ms(shards: int = 60, world: int = 64, workers: int = 8, repeats: int = 5) -> float:
    table = rp2k_like_table(shards)
    times = []
    for epoch in range(repeats):
        start = time.perf_counter()
        plan_training_epoch(table, world - 1, world, workers, batch_size=64, epoch=epoch)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def small_pack(root: Path, args: argparse.Namespace) -> Manifest:
    tree = synthetic_tree(root / "tree", args.classes, args.images_per_class, args.image_size)
    replicate_train(tree, args.replicate)
    return pack_dataset(scan_rp2k(tree), root / "shards", PackConfig(shorter_side=320, samples_per_shard=args.samples_per_shard, workers=0))


def upload(manifest: Manifest, uri: str) -> Manifest:
    for name in storage.listdir(manifest.location_root):
        if not name.startswith("."):
            storage.write_bytes(storage.join(uri, name), storage.read_bytes(manifest.location(name)))
    return Manifest.load(uri)


def bytes_read_ratio(manifest: Manifest, world: int, workers: int, chunk_mb: float) -> tuple[float, int]:
    read = samples = 0
    for rank in range(world):
        loader = ShardLoader(manifest, "train", RawJpeg(), LoaderConfig(DataConfig(batch_size=16, loader_workers=workers, chunk_mb=chunk_mb)),
                             rank, world)
        samples += sum(len(b["key"]) for b in loader)
        read += loader.stats.bytes_read
    return read / sum(s.bytes for s in manifest.shards("train")), samples


def epoch_rate(loader: ShardLoader, state: dict[str, int]) -> tuple[float, dict[str, float]]:
    state["epoch"] += 1
    loader.set_epoch(state["epoch"])
    start = time.perf_counter()
    images = sum(len(b["key"]) for b in loader)
    seconds = time.perf_counter() - start
    return images / seconds, {"seconds": seconds, "images": images, "bytes_read": loader.stats.bytes_read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--images-per-class", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=640, help="longer side of the synthetic photos, px")
    parser.add_argument("--replicate", type=int, default=4, help="hard-link copies of each train image")
    parser.add_argument("--samples-per-shard", type=int, default=400)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the img/s part")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep the tree and shards here and reuse them")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    info = machine_info()
    print_machine(info)

    print("\n1. planned read amplification (bytes planned / split bytes), RP2K-sized split")
    rows = planned_amplification()
    print_table(rows, ["shards", "loader workers", "world", "chunk plan", "shard deal (before)"])
    worst = max(r[3] for r in rows)
    plan_ms = planning_ms()
    print(f"worst chunk-plan amplification: {worst:.4f}; planning one rank's epoch at 64 x 8, 60 shards: {plan_ms:.1f} ms")

    from tests import s3server

    results = {"machine": info, "amplification": rows, "worst_amplification": worst, "plan_ms": plan_ms}
    with workdir(args.workdir, "rp2k-scale-") as root:
        local = small_pack(root, args)
        train_bytes = sum(s.bytes for s in local.shards("train"))
        print(f"\npack: {local.num_samples('train')} train samples in {len(local.shards('train'))} shards, "
              f"{train_bytes / 1e6:.1f} MB")
        process, server = s3server.start(root / "seaweedfs")
        try:
            import os

            os.environ.update(server.env)
            remote = upload(local, server.uri("bench", "shards"))
            print("\n2. bytes actually read / split bytes, one training epoch at world 3 x 2 workers")
            read = {}
            for name, manifest in (("local", local), ("s3", remote)):
                ratio, samples = bytes_read_ratio(manifest, 3, 2, args.chunk_mb)
                read[name] = ratio
                print(f"  {name:<6s} {ratio:.4f} ({samples} samples)")
            results["bytes_read_ratio"] = read

            print(f"\n3. loader img/s, one training epoch per measurement, {args.workers} workers, batch {args.batch_size}")
            modes, loaders = {}, []
            for kind, transform in (("RawJpeg", RawJpeg()), ("TrainTransform", TrainTransform(InputSpec(224, 256), AugmentConfig()))):
                for name, manifest in (("local", local), ("s3", remote)):
                    loader = ShardLoader(manifest, "train", transform,
                                         LoaderConfig(DataConfig(batch_size=args.batch_size, loader_workers=args.workers, chunk_mb=args.chunk_mb)))
                    loaders.append(loader)
                    state = {"epoch": 0}
                    epoch_rate(loader, state)  # warm-up: workers started, filesystems built
                    modes[f"{kind} {name}"] = (lambda loader=loader, state=state: epoch_rate(loader, state))
            series = interleaved(modes, args.repeats)
            table = []
            for kind in ("RawJpeg", "TrainTransform"):
                lo, s3 = series[f"{kind} local"], series[f"{kind} s3"]
                table.append([kind, lo.median, s3.median, paired_ratio(s3, lo)])
            print_table(table, ["transform", "local img/s", "S3 img/s", "S3 / local"])
            results["img_per_s"] = table
        finally:
            s3server.stop(process)
    save_json(args.json, results)


if __name__ == "__main__":
    main()
