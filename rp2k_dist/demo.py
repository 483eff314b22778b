"""``rp2k demo``: the whole pipeline on the embedded synthetic RP2K, on this machine.

synthetic RP2K (exact on-disk layout, quirks included) -> WebDataset shards + manifest ->
verify -> distributed ResNet-34 training on local Ray workers -> evaluation (Table 2) ->
API-Net specialists for liquor and cosmetics -> routed ensemble (Table 3) -> UMAP (Fig. 3)
-> open set (classes never trained on: gallery recall, AUROC, false accepts) -> Markdown/HTML
report.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from . import run_folder
from .config import load_config
from .data.holdout import held_out_classes, held_out_per_class

#: Dataset sizes: (classes, mean images per class, image size px, epochs, specialist epochs).
SIZES = {
    "tiny": (8, 10, 64, 1, 1),
    "small": (24, 24, 96, 4, 2),
    "default": (48, 34, 128, 12, 6),
}
#: The default demo's specialist categories get more images and a larger test share (60+
#: test images each, so Table 3 can resolve about 10 points; 11 and 19 before), the other
#: classes fewer: (image factor, test share) per type (SynthConfig.focus).
FOCUS = {"default": {"liquor": (1.3, 0.35), "cosmetics": (2.2, 0.35)}}
SPECIALISTS = ("liquor", "cosmetics")  # the paper's hard meta-categories (Table 3)
PRESET = "demo"  # jobs/demo.yaml, shipped inside the package as rp2k_dist/presets/demo.yaml
SPECIALIST_PRESET = "demo_apinet"  # the specialists' own recipe, crop and augmentation (jobs/demo_apinet.yaml)


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def training_line(done_before: int, final: dict, seconds: float) -> str:
    """What this call trained: all epochs, the rest of a resumed run, or nothing."""
    epochs = final["epoch"]
    if done_before >= epochs:
        return f"the run had finished its {epochs} epochs before: nothing to train (remove its folder to retrain)"
    resumed = f", resumed after epoch {done_before}" if done_before else ""
    return (f"trained {epochs - done_before} of {epochs} epochs in {seconds:.0f} s{resumed} "
            f"({final['images_per_second']:.0f} img/s in the last epoch)")


def specialist_curves(category: str, classes: int, history: list[dict]) -> str:
    """A specialist's top-1 per epoch on the validation split and on test, and the epoch it
    delivers (``run.select_epoch=holdout``: the best on validation; else its last)."""
    def curve(metric: str) -> str:
        return " ".join(f"{m[metric]:.1f}" for m in history if metric in m)

    last = history[-1]
    line = f"{category}: {classes} classes; top-1 per epoch (epoch 1 with a frozen backbone)"
    if "holdout_top1" not in last:
        return f"{line} on {last['val_samples']} test images: {curve('val_top1')} %"
    kept = last["selected_epoch"]
    chosen = next((m for m in history if m["epoch"] == kept and "holdout_top1" in m), last)
    gap = chosen["holdout_top1"] - chosen.get("val_top1", chosen["holdout_top1"])
    return (f"{line} on {last.get('holdout_samples', 0)} validation images (data.holdout): {curve('holdout_top1')} %, "
            f"on {last['val_samples']} test images: {curve('val_top1')} %; delivers epoch {kept}, the best on "
            f"validation ({last.get('selected_val_top1', last['val_top1']):.1f} % on test; validation read "
            f"{gap:+.1f} points from test there)")


def run_demo(out: Path, size: str = "default", address: str | None = None, seed: int = 0) -> int:
    """The whole pipeline into ``out``; ``seed`` is every run's ``run.seed`` (model
    initialisation, data order, augmentation; the dataset stays the same)."""
    from .data.pack import PackConfig, pack_dataset
    from .data.rp2k import scan_rp2k
    from .data.synth import SynthConfig, make_synthetic_rp2k
    from .data.verify import verify_shards
    from .analysis.report import write_report
    from .engine.machine_speed import reference_line
    from .analysis.umap_plot import embed_and_project, plot_umap
    from .evaluation.table3_text import verdict
    from .evaluation.ensemble_eval import evaluate_ensemble
    from .evaluation.openset import evaluate_openset
    from .run_folder import find_checkpoint
    from .launch.trainer import read_metrics, run_training

    classes, per_class, image_size, epochs, specialist_epochs = SIZES[size]
    out = out.resolve()
    start = time.perf_counter()

    t = _step(f"1/6 synthetic RP2K ({classes} classes, ~{per_class} images each, {image_size} px)")
    source = out / "rp2k"
    summary = make_synthetic_rp2k(source, SynthConfig(classes=classes, images_per_class=per_class,
                                                      image_size=image_size, focus=FOCUS.get(size, {})), progress=True)
    print(f"{summary.train_images} train + {summary.test_images} test images in {source}/all "
          f"({time.perf_counter() - t:.1f} s); planted quirks: {', '.join(summary.quirks)}")

    t = _step("2/6 pack into WebDataset shards")
    index = scan_rp2k(source, summary.metadata_path)
    for line in index.report.lines():
        print(f"  note: {line}")
    shards = out / "shards"
    manifest = pack_dataset(index, shards, PackConfig(shorter_side=64, shard_size_mb=0.25), overwrite=True, progress=True)
    for split in ("train", "test"):
        print(f"{split}: {manifest.num_samples(split)} samples in {len(manifest.shards(split))} shards")
    for skip in manifest.data["skipped"]:
        print(f"  skipped {skip['source']}: {skip['reason']}")
    problems = verify_shards(shards)
    print(f"verify: {'all shards match the manifest' if not problems else problems} ({time.perf_counter() - t:.1f} s)")

    t = _step("3/6 distributed training: ResNet-34, 2 Ray Train workers (DDP, gloo)")
    # about one class in twelve never trained on (4 of the default 48), for the open-set table
    config = load_config(PRESET, [f"data.shards={shards}", f"run.storage_path={out / 'runs'}", f"optim.epochs={epochs}",
                                  f"data.holdout_classes={max(1, classes // 12)}", f"run.seed={seed}"])
    done_before = len(read_metrics(config))  # a rerun resumes the run folder it left
    final = run_training(config, address=address)
    run_dir = out / "runs" / config.run.name
    print(training_line(done_before, final, time.perf_counter() - t))

    chance = 100.0 / manifest.num_classes
    print(f"test top-1 {final['val_top1']:.1f} % (chance {chance:.1f} %), top-5 {final['val_top5']:.1f} %")

    t = _step(f"4/6 API-Net specialists for {' and '.join(SPECIALISTS)} (from the ResNet-34, P x K batches)")
    specialist_runs = []
    unseen = set(held_out_classes(manifest.classes, config.data.holdout_classes))
    held = held_out_per_class(manifest, config.data.holdout, config.data.holdout_by)
    for category in SPECIALISTS:
        members = [c["index"] for c in manifest.classes if c["type"] == category]
        n = len(members)
        pairable = [c for c in members if manifest.classes[c]["counts"]["train"] >= 2]
        images = sum(manifest.classes[c]["counts"]["train"] for c in pairable)
        if len(pairable) < 2:
            print(f"{category}: fewer than 2 classes with 2+ train images, no specialist")
            continue
        # P x K batches per worker must fit the category's few images (tiny demo: 1 worker, K=2)
        per_class, workers = (4, 2) if min(4, len(pairable)) * 4 * 2 <= images else (2, 1)
        # The Table 3 recipe at the demo's scale (jobs/demo_apinet.yaml): backbone + this
        # category's fc rows from the ResNet-34, plain cross-entropy + ranking loss, the
        # official SGD schedule, the first epoch with a frozen backbone, SyncBatchNorm over both
        # workers and the backbone at a tenth of the head's learning rate; the epoch
        # that validates best on data.holdout is the one delivered (the last if the category's
        # classes have too few images to hold any out).
        validated = sum(int(held[c]) for c in members if c not in unseen)
        specialist = load_config(SPECIALIST_PRESET, [
            f"data.shards={shards}", f"data.holdout_classes={config.data.holdout_classes}", f"run.storage_path={out / 'runs'}", f"run.name=demo-apinet-{category}",
            f"model.weights={find_checkpoint(run_dir)}", f"data.meta_category=type={category}",
            f"data.classes_per_batch={min(4, len(pairable))}", f"data.images_per_class={per_class}",
            f"run.workers={workers}", f"optim.epochs={specialist_epochs}", f"run.seed={seed}",
        ] + ([] if validated else ["run.select_epoch=last"]))
        run_training(specialist, address=address)
        specialist_runs.append(out / "runs" / specialist.run.name)
        print(specialist_curves(category, n, read_metrics(specialist)))
    print(f"({time.perf_counter() - t:.0f} s)")

    _step("5/6 evaluation: Table 2 and the routed ensemble (Table 3)")
    table = (run_dir / run_folder.TABLE2).read_text(encoding="utf-8")
    print(f"Table 2 (per meta-category) from {run_dir / run_folder.TABLE2}:\n{table}")
    if specialist_runs:
        ensemble = evaluate_ensemble(run_dir, specialist_runs, shards)
        print(f"Table 3 (within the meta-category: (a) general, (b) general among the category's classes, "
              f"(c) specialist alone, (d) ensemble routed by the general top-1, (e) routed by probability mass, "
              f"as top-1 / top-5; routing recall / precision) from {run_dir / 'table3.md'}:\n{ensemble.markdown}")
        print(f"(e) routing thresholds {', '.join(f'{t:.3f}' for t in ensemble.thresholds)}: "
              f"{ensemble.threshold_source}")
        print(verdict(ensemble.table3) + "\n")
    t = _step("6/6 open set, UMAP of the features (paper Fig. 3) and the report")
    if config.data.holdout_classes:
        result = evaluate_openset(run_dir, shards)
        n = len(result.unseen)
        print(f"open set: {n} {'class' if n == 1 else 'classes'} never trained on ({', '.join(c['name'] for c in result.unseen)}); "
              f"galleries of 1 or 5 of their train images, known-product gallery of 5 per seen class, threshold "
              f"{result.threshold:.3f} ({result.threshold_source}):\n{result.full_markdown()}")
    frame = embed_and_project(run_dir, shards)
    plot_umap(frame, run_dir / run_folder.UMAP_PNG, "UMAP of the demo ResNet-34's test-set features")
    markdown, html = write_report(run_dir)
    print(f"({time.perf_counter() - t:.0f} s)")
    print(f"\nreport: {html}\n        {markdown}")
    print(f"run folder: {run_dir} (config.yaml, metrics.jsonl, predictions.parquet, evaluation.json, umap.png, checkpoints)")
    print(f"demo finished in {time.perf_counter() - start:.0f} s; {reference_line()}")
    return 0


def run_demo_seeds(out: Path, seeds: Sequence[int], size: str = "default", address: str | None = None) -> int:
    """The demo once per seed (``out/seed-<s>``, the same dataset in each), then the headline
    figures of all seeds with their mean ± std and the ensemble's gain over the seeds, printed
    and written to ``out/seeds.md`` (:mod:`rp2k_dist.analysis.seed_summary`)."""
    from .analysis.seed_summary import summary_markdown

    out = out.resolve()
    name = load_config(PRESET).run.name
    for seed in seeds:
        print(f"\n######## seed {seed} of {', '.join(map(str, seeds))}: {out / f'seed-{seed}'}", flush=True)
        run_demo(out / f"seed-{seed}", size=size, address=address, seed=seed)
    text = summary_markdown([out / f"seed-{seed}" / "runs" / name for seed in seeds], seeds)
    (out / "seeds.md").write_text(f"# rp2k demo --size {size}, seeds {', '.join(map(str, seeds))}\n\n{text}",
                                  encoding="utf-8")
    print(f"\n== the demo over {len(seeds)} seeds (written to {out / 'seeds.md'})\n{text}")
    return 0
