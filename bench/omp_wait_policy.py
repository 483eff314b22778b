"""OpenMP's wait policy for the CPU workers of a local Ray: ``rp2k train`` with and without it.

``rp2k train`` / ``rp2k demo`` without ``--address`` start a local Ray whose Train workers
share this machine's cores. OpenMP threads that have finished their part of an op spin while
they wait for the next one (libgomp's default, ``OMP_WAIT_POLICY`` unset, spins for a while
before it sleeps; ``ACTIVE`` spins always); two workers on two cores then burn each other's
time. The project sets ``OMP_WAIT_POLICY=PASSIVE`` for the local Ray it starts
(:func:`rp2k_dist.launch.trainer.ray_address`) unless the caller set it. This script runs the
same short training (the demo's preset: 2 Ray Train workers, 1 CPU each, ResNet-34 at 48 px)
under three settings, interleaved (A B C, C B A, ...), and prints the training images/s of
each run (epochs after the first), the median per setting, and the ratio of each setting to
PASSIVE within each repeat, beside the machine's reference speed measured before and after:

    PASSIVE   what the project sets (the variable unset in the caller's environment)
    default   libgomp's default (the variable set empty, which libgomp ignores)
    ACTIVE    spin while waiting

Usage: ``python bench/omp_wait_policy.py [--epochs 3] [--repeats 2] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine_info, print_machine  # noqa: E402

from rp2k_dist.engine.machine_speed import reference_line  # noqa: E402

#: Setting name -> the value of OMP_WAIT_POLICY in the environment ``rp2k train`` starts with
#: (None: not set, so the project's own PASSIVE applies).
SETTINGS: dict[str, str | None] = {"PASSIVE": None, "default": "", "ACTIVE": "ACTIVE"}


def make_shards(folder: Path, classes: int, per_class: int) -> Path:
    """A small synthetic RP2K packed at 64 px (no quirks: every run reads the same images)."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    summary = make_synthetic_rp2k(folder / "rp2k", SynthConfig(classes=classes, images_per_class=per_class,
                                                               image_size=96, quirks=False))
    index = scan_rp2k(summary.root, summary.metadata_path)
    pack_dataset(index, folder / "shards", PackConfig(shorter_side=64, shard_size_mb=8))
    return folder / "shards"


def train_once(shards: Path, storage: Path, name: str, policy: str | None, epochs: int) -> tuple[float, float]:
    """One ``rp2k train demo`` in a fresh process; (training img/s after epoch 1, wall seconds)."""
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    command = [str(Path(sys.executable).with_name("rp2k")), "train", "demo",
               "--set", f"data.shards={shards}", "--set", f"optim.epochs={epochs}",
               "--set", "data.holdout_classes=0", "--set", "run.eval_every=1000",
               "--set", f"run.storage_path={storage}", "--set", f"run.name={name}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        tail = "\n".join(done.stdout.splitlines()[-15:])
        raise SystemExit(f"rp2k train {name} failed (exit {done.returncode}):\n{tail}")
    rows = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "train_images" in r and "epoch_seconds" in r][1:]
    return sum(r["train_images"] for r in rows) / sum(r["epoch_seconds"] for r in rows), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats")
    parser.add_argument("--classes", type=int, default=24)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--out", type=Path, help="keep shards and runs here (default: a temp folder)")
    args = parser.parse_args()

    info = machine_info()
    print_machine(info)
    before = reference_line()
    print(f"before: {before}", flush=True)
    folder = args.out or Path(tempfile.mkdtemp(prefix="omp-wait-"))
    shards = make_shards(folder, args.classes, args.per_class)
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    ratios: dict[str, list[float]] = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for repeat in range(args.repeats):
        order = names if repeat % 2 == 0 else names[::-1]
        this: dict[str, float] = {}
        for name in order:
            rate, wall = train_once(shards, folder / "runs", f"{name.lower()}-{repeat}", SETTINGS[name], args.epochs)
            this[name] = rate
            rates[name].append(rate)
            print(f"  repeat {repeat + 1}/{args.repeats}  {name:<8s} {rate:7.1f} img/s  ({wall:.0f} s wall)", flush=True)
        for name in names:
            ratios[name].append(this[name] / this["PASSIVE"])
    after = reference_line()
    print(f"after:  {after}")
    print(f"\n{args.epochs} epochs a run ({args.epochs - 1} timed), {args.repeats} repeats, "
          f"{args.classes} classes x {args.per_class} images; load avg at the end {os.getloadavg()[0]:.2f}")
    print("| setting | img/s per repeat | median img/s | ratio to PASSIVE (median of repeats) |")
    print("|---|---|---:|---:|")
    for name in names:
        per = ", ".join(f"{r:.1f}" for r in rates[name])
        print(f"| {name} | {per} | {statistics.median(rates[name]):.1f} | {statistics.median(ratios[name]):.2f} |")


if __name__ == "__main__":
    main()
