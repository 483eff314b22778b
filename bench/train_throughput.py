"""Training throughput: how close the data path gets to the compute bound, and what Ray costs.

Modes, in one process, same model / resolution / batch / compute settings:
  (a) compute bound: synthetic tensors already on the device, model step only;
  (b) full pipeline from shards, JPEG decode + augmentation on the CPU loader workers;
  (c) full pipeline from shards, JPEG decode + augmentation on the device.
Prints img/s of each and the ratios (b)/(a), (c)/(a).

``--ray-overhead`` also runs the same training epochs through ``rp2k train`` with one Ray
Train worker and through the engine alone, and prints the per-step overhead of Ray.

  python bench/train_throughput.py                                  # CPU: small resolution
  python bench/train_throughput.py --device cuda --crop-size 224 --batch-size 256 --steps 50
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rp2k_dist.config import DataConfig, load_config
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.transforms import RawJpeg, TrainTransform
from rp2k_dist.engine.batches import CpuBatches, DeviceBatches
from rp2k_dist.losses import ClassBalancedLoss
from rp2k_dist.models import create_model, input_spec


def make_shards(folder: Path, classes: int, per_class: int, image_size: int) -> Path:
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    summary = make_synthetic_rp2k(folder / "rp2k", SynthConfig(classes=classes, images_per_class=per_class,
                                                               image_size=image_size, quirks=False))
    index = scan_rp2k(summary.root, summary.metadata_path)
    pack_dataset(index, folder / "shards", PackConfig(shorter_side=min(320, image_size), shard_size_mb=8))
    return folder / "shards"


class Step:
    """One optimiser step of the engine's kind (bf16 autocast on CUDA, channels_last, SGD)."""

    def __init__(self, args, num_classes: int, counts: list[int], device: torch.device):
        self.model = create_model(args.model, num_classes).to(device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.criterion = ClassBalancedLoss(counts, 0.99).to(device)
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, **fused)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
        self.device = device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.model.train()
        with self.autocast:
            output = self.forward(images, labels)
            loss = self.model.loss(output, labels, self.criterion)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def timed(step: Step, batches, warmup: int, steps: int, batch_size: int) -> float:
    """img/s over ``steps`` steps after ``warmup`` steps."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    step.sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(*next(iterator))
    step.sync()
    return steps * batch_size / (time.perf_counter() - start)


def synthetic(batch_size: int, crop: int, classes: int, device: torch.device, channels_last: bool):
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    while True:
        yield images, labels


def from_shards(manifest: Manifest, spec, batch_size: int, workers: int, device: torch.device, on_device: bool, channels_last: bool):
    transform = RawJpeg() if on_device else TrainTransform(spec, AugmentConfig())
    loader = ShardLoader(manifest, "train", transform, LoaderConfig(DataConfig(batch_size=batch_size, loader_workers=workers),
                                                                     pin_memory=device.type == "cuda"))
    prepare = DeviceBatches(spec, AugmentConfig(), device, channels_last) if on_device else CpuBatches(spec, device, channels_last)
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        for batch in loader:
            images, labels, _ = prepare(batch)
            yield images, labels
        epoch += 1


def ray_overhead(shards: Path, args, storage: Path) -> dict[str, float]:
    """Per-step time of the same epochs: engine alone vs ``rp2k train`` with one Ray worker."""
    from rp2k_dist.engine.context import LocalContext
    from rp2k_dist.engine.train import train_worker
    from rp2k_dist.launch.trainer import read_metrics, run_training
    from rp2k_dist.storage import RunStorage

    overrides = [f"data.shards={shards}", f"data.batch_size={args.batch_size}", f"data.loader_workers={args.workers}",
                 f"model.name={args.model}", f"model.crop_size={args.crop_size}", f"model.channels_last={str(args.channels_last).lower()}",
                 f"optim.epochs={args.ray_epochs}", "run.eval_every=1000", "run.checkpoint_every=1000", "run.workers=1",
                 "run.cpus_per_worker=1", f"run.storage_path={storage}",
                 f"run.use_gpu={str(args.device == 'cuda').lower()}"]
    per_epoch: dict[str, list[float]] = {"engine": [], "ray": []}
    threads = torch.get_num_threads()
    for repeat in range(args.repeats):
        direct = load_config(None, overrides + [f"run.name=direct-{repeat}"])
        torch.set_num_threads(1)  # what Ray gives a worker with run.cpus_per_worker=1 (OMP_NUM_THREADS=1)
        train_worker(direct, LocalContext(RunStorage(direct.run.storage_path, direct.run.name), args.device))
        torch.set_num_threads(threads)
        per_epoch["engine"] += [m["epoch_seconds"] / m["train_images"] for m in read_metrics(direct)[1:]]
        ray_config = load_config(None, overrides + [f"run.name=ray-{repeat}"])
        run_training(ray_config)
        per_epoch["ray"] += [m["epoch_seconds"] / m["train_images"] for m in read_metrics(ray_config)[1:]]
    engine, ray_ = statistics.median(per_epoch["engine"]), statistics.median(per_epoch["ray"])
    return {"engine_img_s": 1 / engine, "ray_img_s": 1 / ray_, "ray_overhead_pct": 100 * (ray_ / engine - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet34")
    parser.add_argument("--crop-size", type=int, default=0, help="0 = 64 on CPU, the model's own on CUDA")
    parser.add_argument("--batch-size", type=int, default=0, help="0 = 32 on CPU, 256 on CUDA")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per mode (0 = 8 CPU / 50 CUDA)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the median is reported")
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for CUDA, off for CPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--shards", type=Path, help="packed dataset (default: a synthetic one in a temp folder)")
    parser.add_argument("--ray-overhead", action="store_true", help="also measure rp2k train (1 Ray worker) vs the engine")
    parser.add_argument("--ray-epochs", type=int, default=3)
    parser.add_argument("--only-ray-overhead", action="store_true", help="skip modes (a)-(c)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.crop_size = args.crop_size or (input_spec(args.model).crop_size if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (50 if cuda else 8)
    if args.channels_last is None:
        args.channels_last = cuda
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp), classes=48, per_class=60, image_size=400 if cuda else 160)
        manifest = Manifest.load(shards)
        spec = input_spec(args.model, args.crop_size)
        step = Step(args, manifest.num_classes, manifest.class_counts("train"), device)
        results: dict[str, list[float]] = {"a_compute_bound": [], "b_cpu_decode": [], "c_device_decode": []}
        for _ in range(0 if args.only_ray_overhead else args.repeats):  # interleaved: the machine's noise hits every mode alike
            results["a_compute_bound"].append(timed(step, synthetic(args.batch_size, args.crop_size, manifest.num_classes, device, args.channels_last), args.warmup, args.steps, args.batch_size))
            results["b_cpu_decode"].append(timed(step, from_shards(manifest, spec, args.batch_size, args.workers, device, False, args.channels_last), args.warmup, args.steps, args.batch_size))
            results["c_device_decode"].append(timed(step, from_shards(manifest, spec, args.batch_size, args.workers, device, True, args.channels_last), args.warmup, args.steps, args.batch_size))
        summary = {k: statistics.median(v) for k, v in results.items() if v}
        name = torch.cuda.get_device_name() if cuda else "cpu"
        print(f"{args.model} @ {args.crop_size}px, batch {args.batch_size}, {name}, channels_last={args.channels_last}, "
              f"compile={args.compile}, loader workers {args.workers}, torch {torch.__version__}")
        for key, value in summary.items():
            print(f"  {key:16s} {value:9.1f} img/s")
        if summary:
            print(f"  (b)/(a) = {summary['b_cpu_decode'] / summary['a_compute_bound']:.2f}   "
                  f"(c)/(a) = {summary['c_device_decode'] / summary['a_compute_bound']:.2f}")
        if args.ray_overhead:
            overhead = ray_overhead(Path(shards), args, Path(tmp) / "runs")
            summary.update(overhead)
            print(f"  engine alone {overhead['engine_img_s']:.1f} img/s, through Ray Train (1 worker) "
                  f"{overhead['ray_img_s']:.1f} img/s: Ray overhead per step {overhead['ray_overhead_pct']:+.1f} %")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": name, **summary}, indent=1))


if __name__ == "__main__":
    main()
