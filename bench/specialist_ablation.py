"""Specialists that help: what the API-Net specialist's BatchNorm and backbone learning rate
do to Table 3, on two synthetic fine-grained categories, over several seeds.

Each set is a synthetic RP2K (``SynthConfig.fine_grained``) whose liquor category is one
product family of 6 SKUs (40 images each, 40 % in test) differing in one small detail: the
accent stripe's colour ("accent") or the label mark's position and the bottle's proportions
("mark"). Per set: one
general ResNet-34 (one process, the demo's recipe, 30 epochs at 32 px, 10 % of train held out
for the mass threshold); then, for each of 3 seeds (the specialist's: new layers, sampling,
dropout), an API-Net specialist for liquor from it for every cell of the grid

    model.bn in {train, frozen, sync} x optim.backbone_lr_scale in {1, 0.1} x {short, long}

with the demo's specialist recipe otherwise (official SGD: lr 0.01 per 120 images, momentum
0.9, wd 5e-4, cosine, one frozen-backbone epoch, P x K = 3 x 4 per worker). Specialists train
on 2 ranks (torch.distributed over gloo in 2 local processes, no Ray) so that ``sync`` means
something: ``train`` normalises by each rank's 12 images, ``sync`` by the global 24.

Recorded per specialist: its validation top-1 after every epoch (on the category's test
images) and its Table 3 row from ``rp2k_dist.evaluation.ensemble_eval.evaluate_ensemble``:
(a) general, (b) general among the category's classes, (c) specialist alone, (d) ensemble
routed by the general top-1, (e) ensemble routed by probability mass when available.

    .venv/bin/python bench/specialist_ablation.py --out /tmp/spec-ablation        # the grid
    .venv/bin/python bench/specialist_ablation.py --out /tmp/spec-ablation --summarize

Runs already in ``<out>/results.jsonl`` are skipped, so an interrupted grid resumes. The
summary (Markdown table, mean +- std over seeds) goes to stdout and ``<out>/summary.md``, the
figure (mean validation curves) to ``<out>/specialist_ablation.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from rp2k_dist.config import load_config

SETS = ("accent", "mark")
BN_MODES = ("train", "frozen", "sync")
SCALES = (1.0, 0.1)
SCHEDULES = {"short": 3, "long": 6}  # specialist epochs, the first with a frozen backbone (the demo: 6)
CATEGORY = "liquor"
FINE_CLASSES = 6
CROP = 32
GENERAL_EPOCHS = 30
HOLDOUT = 0.1  # the general run's validation split for the mass threshold of (e)


def make_set(out: Path, cue: str) -> Path:
    """The synthetic RP2K with a fine-grained liquor family, packed; returns the shards."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    shards = out / "sets" / cue / "shards"
    if (shards / "dataset.json").is_file():
        return shards
    summary = make_synthetic_rp2k(out / "sets" / cue / "rp2k", SynthConfig(
        classes=12, images_per_class=40, image_size=64, quirks=False, test_fraction=0.4, fine_grained=cue,
        fine_classes=FINE_CLASSES, workers=2))
    pack_dataset(scan_rp2k(summary.root, summary.metadata_path), shards,
                 PackConfig(shorter_side=48, samples_per_shard=128, workers=1), overwrite=True)
    return shards


def _common(shards: Path, runs: Path, name: str, seed: int) -> list[str]:
    return [f"data.shards={shards}", f"run.storage_path={runs}", f"run.name={name}", f"run.seed={seed}",
            "data.loader_workers=0", f"model.crop_size={CROP}", "run.keep_checkpoints=1",
            "run.checkpoint_every=1000"]  # the last epoch's checkpoint only


def train_general(shards: Path, runs: Path, cue: str, seed: int) -> Path:
    """The demo's ResNet-34 recipe in one process (global batch 32 as the demo's 2 x 16)."""
    from rp2k_dist.engine.context import LocalContext
    from rp2k_dist.engine.train import train_worker
    from rp2k_dist.storage import RunStorage

    name = f"general-{cue}-{seed}"
    config = load_config("demo", _common(shards, runs, name, seed) + [
        "data.batch_size=32", "run.workers=1", f"optim.epochs={GENERAL_EPOCHS}", f"data.holdout={HOLDOUT}"])
    storage = RunStorage(config.run.storage_path, name)
    if not storage.exists("evaluation.json"):
        train_worker(config, LocalContext(storage, "cpu"))
    return runs / name


def specialist_overrides(shards: Path, runs: Path, name: str, seed: int, weights: str, bn: str, scale: float,
                         epochs: int) -> list[str]:
    """The demo's specialist recipe (``rp2k_dist.demo``) with one grid cell's settings."""
    return _common(shards, runs, name, seed) + [
        "model.name=apinet", f"model.weights={weights}", "model.freeze_backbone_epochs=1",
        f"data.meta_category=type={CATEGORY}", "data.classes_per_batch=3", "data.images_per_class=4",
        "run.workers=2", f"optim.epochs={epochs}", "optim.optimizer=sgd", "optim.lr=0.01",
        "optim.lr_reference_batch=120", "optim.momentum=0.9", "optim.weight_decay=0.0005", "optim.warmup_epochs=0",
        f"model.bn={bn}", f"optim.backbone_lr_scale={scale}"]


def _ranks(rank: int, world: int, port: int, out: Path, cue: str, seed: int, shards: Path, general: Path) -> None:
    """One rank (a spawned process) training every grid cell of one set and seed in turn;
    rank 0 evaluates each specialist (Table 3) and appends its record."""
    import torch.distributed as dist

    from rp2k_dist.engine.context import LocalContext
    from rp2k_dist.engine.train import train_worker
    from rp2k_dist.evaluation.ensemble_eval import evaluate_ensemble
    from rp2k_dist.run_folder import find_checkpoint
    from rp2k_dist.storage import RunStorage

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results, runs = out / "results.jsonl", out / "runs"
    done = {(r["set"], r["seed"], r["bn"], r["scale"], r["schedule"]) for r in read_results(results)}
    weights = str(find_checkpoint(general))
    try:
        for bn, scale, schedule in cells():
            if (cue, seed, bn, scale, schedule) in done:
                continue
            started = time.perf_counter()
            name = f"apinet-{cue}-{seed}-{bn}-{scale:g}-{schedule}"
            if rank == 0 and (runs / name).exists():  # an interrupted cell starts over
                shutil.rmtree(runs / name)
            dist.barrier()
            config = load_config("demo", specialist_overrides(shards, runs, name, seed, weights, bn, scale,
                                                            SCHEDULES[schedule]))
            storage = RunStorage(config.run.storage_path, name)
            train_worker(config, LocalContext(storage, "cpu", keep=1, rank=rank, world_size=world))
            if rank == 0:
                history = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
                ensemble = evaluate_ensemble(general, [runs / name], shards, out=runs / name / "ensemble", workers=0)
                record = {"set": cue, "seed": seed, "bn": bn, "scale": scale, "schedule": schedule,
                          "curve": [m["val_top1"] for m in history], "table3": ensemble.table3[0],
                          "seconds": round(time.perf_counter() - started, 1)}
                with results.open("a") as handle:
                    handle.write(json.dumps(record, default=float) + "\n")
                for folder in (runs / name).glob("epoch_*"):  # 85 MB each; the record is kept
                    shutil.rmtree(folder)
                row = record["table3"]
                print(f"[{time.strftime('%H:%M:%S')}] {name}: curve {' '.join(f'{v:.0f}' for v in record['curve'])}"
                      f" | (b) {row['restricted_top1']:.1f} (c) {row['specialist_top1']:.1f}"
                      f" (d) {row['ensemble_top1']:.1f} | {record['seconds']:.0f} s", flush=True)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cells() -> list[tuple[str, float, str]]:
    return [(bn, scale, schedule) for schedule in SCHEDULES for bn in BN_MODES for scale in SCALES]


def run_grid(out: Path, seeds: list[int], sets: list[str]) -> None:
    """Per set: one general model (seed 0), then every grid cell for every specialist seed."""
    import torch.multiprocessing as mp

    runs = out / "runs"
    for cue in sets:
        shards = make_set(out, cue)
        started = time.perf_counter()
        general = train_general(shards, runs, cue, 0)
        print(f"[{time.strftime('%H:%M:%S')}] general {cue}: {time.perf_counter() - started:.0f} s", flush=True)
        for seed in seeds:
            mp.start_processes(_ranks, args=(2, _free_port(), out, cue, seed, shards, general), nprocs=2,
                               start_method="spawn")


def read_results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# --------------------------------------------------------------------------- summary


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def summarize(out: Path) -> str:
    """The Markdown table: per set, schedule and cell, mean +- std over seeds."""
    records = read_results(out / "results.jsonl")
    columns = [("(b) general, category's classes", lambda r: r["table3"]["restricted_top1"]),
               ("(c) specialist", lambda r: r["table3"]["specialist_top1"]),
               ("(d) routed by top-1", lambda r: r["table3"]["ensemble_top1"]),
               ("(e) routed by mass", lambda r: r["table3"].get("mass_top1")),
               ("(c) after the frozen epoch", lambda r: r["curve"][0]),
               ("(c) - frozen epoch", lambda r: r["curve"][-1] - r["curve"][0]),
               ("lowest epoch - frozen epoch", lambda r: min(r["curve"]) - r["curve"][0])]
    lines = [f"Top-1 % on the category's test images; mean ± std over seeds "
             f"({len({r['seed'] for r in records})} seeds, {len(records)} specialist runs). "
             f"(a) general over all classes: " + ", ".join(
                 f"{cue} {_mean_std(_general(records, cue))}" for cue in SETS if _general(records, cue)) + ".", "",
             "| set | schedule | model.bn | backbone_lr_scale | " + " | ".join(c for c, _ in columns) + " |",
             "|---|---|---|---:|" + "---:|" * len(columns)]
    for cue in SETS:
        for schedule in SCHEDULES:
            for bn in BN_MODES:
                for scale in SCALES:
                    chosen = [r for r in records if (r["set"], r["schedule"], r["bn"], r["scale"]) == (cue, schedule, bn, scale)]
                    if not chosen:
                        continue
                    cells_ = [_mean_std([v for v in map(get, chosen) if v is not None]) for _, get in columns]
                    lines.append(f"| {cue} | {schedule} ({SCHEDULES[schedule]} ep.) | {bn} | {scale:g} | "
                                 + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


def _general(records: list[dict[str, Any]], cue: str) -> list[float]:
    """(a) of the set's general model (one model per set: one value)."""
    return sorted({r["table3"]["general_top1"] for r in records if r["set"] == cue})


def figure(out: Path, path: Path) -> Path:
    """Mean validation curves per cell (one panel per set and schedule), with (b) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_results(out / "results.jsonl")
    fig, axes = plt.subplots(len(SETS), len(SCHEDULES), figsize=(11, 7.5), squeeze=False)
    styles = {"train": "-", "frozen": "--", "sync": ":"}
    colours = {1.0: "tab:red", 0.1: "tab:blue"}
    for i, cue in enumerate(SETS):
        for j, schedule in enumerate(SCHEDULES):
            ax = axes[i][j]
            restricted = [r["table3"]["restricted_top1"] for r in records if (r["set"], r["schedule"]) == (cue, schedule)]
            if restricted:
                ax.axhline(statistics.mean(restricted), color="grey", linestyle="-.", linewidth=1,
                           label="(b) general, category's classes")
            for bn in BN_MODES:
                for scale in SCALES:
                    curves = [r["curve"] for r in records
                              if (r["set"], r["schedule"], r["bn"], r["scale"]) == (cue, schedule, bn, scale)]
                    if not curves:
                        continue
                    mean = [statistics.mean(c[e] for c in curves) for e in range(len(curves[0]))]
                    ax.plot(range(1, len(mean) + 1), mean, styles[bn], color=colours[scale], marker="o", markersize=3,
                            label=f"bn={bn}, backbone lr x{scale:g}")
            ax.set_title(f"{cue} set, {schedule} schedule ({SCHEDULES[schedule]} epochs, epoch 1 frozen)", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_xticks(range(1, SCHEDULES[schedule] + 1))
            ax.set_ylabel("specialist val top-1 (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (sets, runs, results.jsonl)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--summarize", action="store_true", help="only summarise results.jsonl")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"load average at start: {os.getloadavg()}; torch {torch.__version__}", flush=True)
    if not args.summarize:
        torch.set_num_threads(1)  # 2 threads on 2 shared cores ran 20x slower than 1 (spin-waiting)
        run_grid(args.out, list(range(args.seeds)), args.sets)
    text = summarize(args.out)
    (args.out / "summary.md").write_text(text)
    print(text)
    print(f"figure: {figure(args.out, args.out / 'specialist_ablation.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
