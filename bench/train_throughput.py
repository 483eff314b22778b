"""Training throughput: the engine against timm's step, the data path against the compute bound, and what Ray costs.

Modes, in one process, same model / resolution / batch / threads / compute settings
(bf16 autocast and fused SGD on CUDA, channels_last where asked):
  (a) compute bound: the engine's ``train_one_epoch`` on synthetic tensors already on the device;
  (t) timm's model of the same name, a plain training step (forward, cross-entropy, backward,
      SGD) on the same tensors: the peer the compute bound is held against, as (a)/(t);
  (b) the engine from shards, JPEG decode + augmentation on the CPU loader workers;
  (c) the engine from shards, JPEG decode + augmentation on the device.
Prints img/s of each and the ratios (a)/(t), (b)/(a), (c)/(a); (t) is skipped without timm.

``--ray-overhead`` also runs the same training epochs through ``rp2k train`` with one Ray
Train worker and through the engine alone, and prints the per-step overhead of Ray.

  python bench/train_throughput.py --ray-overhead                   # CPU: small resolution
  python bench/train_throughput.py --device cuda --batch-size 256 --steps 50
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from rp2k_dist.config import DataConfig, load_config
from rp2k_dist.data.augment import AugmentConfig
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.transforms import RawJpeg, TrainTransform
from rp2k_dist.engine.batches import CpuBatches, DeviceBatches
from rp2k_dist.engine.optim import build_optimizer
from rp2k_dist.engine.train import train_one_epoch
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


class EngineStep:
    """The engine's own training loop (:func:`rp2k_dist.engine.train.train_one_epoch`) with
    the engine's model, loss and optimiser as ``train_worker`` builds them."""

    def __init__(self, args, num_classes: int, counts: list[int], device: torch.device):
        self.config = load_config(None, [f"model.name={args.model}", f"model.channels_last={str(args.channels_last).lower()}",
                                         "optim.grad_clip=0", "optim.amp=true", "optim.fused=true"])
        self.model_without_ddp = create_model(args.model, num_classes).to(device)
        if args.channels_last:
            self.model_without_ddp.to(memory_format=torch.channels_last)
        self.model = torch.compile(self.model_without_ddp) if args.compile else self.model_without_ddp
        c = self.config.loss
        self.criterion = ClassBalancedLoss(counts, c.cbl_beta, c.variant, c.focal_gamma, c.label_smoothing).to(device)
        self.optimizer, _ = build_optimizer(self.model_without_ddp, self.config, args.batch_size)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.device = device

    def epoch(self, batches: Iterator, prepare, steps: int) -> float:
        """img/s of ``steps`` steps over ``batches`` (the epoch ends with its metric reads)."""
        loader = _Steps(batches, steps)
        metrics = train_one_epoch(model=self.model, model_without_ddp=self.model_without_ddp, criterion=self.criterion,
                                  optimizer=self.optimizer, lr_scheduler=self.scheduler, data_loader=loader,
                                  batch_to_device=prepare, device=self.device, config=self.config, epoch=0)
        return metrics["images_per_second"]


class _Steps:
    """``steps`` batches of an endless iterator, as a loader for ``train_one_epoch``."""

    def __init__(self, batches: Iterator, steps: int):
        self.batches, self.steps = batches, steps
        self.stats = SimpleNamespace(skipped=0)

    def __iter__(self):
        return itertools.islice(self.batches, self.steps)


class TimmStep:
    """timm's model of the same name in a plain training step: forward under the same
    autocast, cross-entropy (plus 0.4 x the auxiliary head's for InceptionV3, as ours),
    backward, the engine's optimiser settings; no host reads."""

    def __init__(self, args, num_classes: int, device: torch.device, config):
        import timm

        extra = {"aux_logits": True} if args.model == "inception_v3" else {}
        self.model = timm.create_model(args.model, num_classes=num_classes, **extra).to(device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.model) if args.compile else self.model
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer, _ = build_optimizer(self.model, config, args.batch_size)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        self.device = device

    def epoch(self, batches: Iterator, prepare, steps: int) -> float:
        self.model.train()
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the clock starts with nothing queued, as the engine's does
        start = time.perf_counter()
        seen = 0
        for images, labels, _ in itertools.islice(batches, steps):
            with self.autocast:
                output = self.forward(images)
                if isinstance(output, tuple):
                    loss = self.criterion(output[0], labels) + 0.4 * self.criterion(output[1], labels)
                else:
                    loss = self.criterion(output, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            seen += labels.shape[0]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - start)


def timed(step, batches: Iterator, prepare, warmup: int, steps: int) -> tuple[float, float]:
    """(img/s, img per CPU second of this process) over ``steps`` steps after ``warmup``.

    On a shared CPU the second barely moves with other jobs' load; it leaves out loader
    processes, so it compares (a) with (t) only."""
    step.epoch(batches, prepare, warmup)
    wall, cpu = time.perf_counter(), time.process_time()
    rate = step.epoch(batches, prepare, steps)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return rate, rate * wall / max(cpu, 1e-9)


def unchanged(batch):
    return batch


def synthetic(batch_size: int, crop: int, classes: int, device: torch.device, channels_last: bool):
    images = torch.randn(batch_size, 3, crop, crop, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, classes, (batch_size,), device=device)
    keys = [str(i) for i in range(batch_size)]
    while True:
        yield images, labels, keys


def from_shards(manifest: Manifest, spec, batch_size: int, workers: int, device: torch.device, on_device: bool):
    """The loader's batches, epoch after epoch, without end."""
    transform = RawJpeg() if on_device else TrainTransform(spec, AugmentConfig())
    loader = ShardLoader(manifest, "train", transform, LoaderConfig(DataConfig(batch_size=batch_size, loader_workers=workers),
                                                                     pin_memory=device.type == "cuda"))

    def batches():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    return batches()


def prepare_for(spec, device: torch.device, on_device: bool, channels_last: bool):
    if on_device:
        return DeviceBatches(spec, AugmentConfig(), device, channels_last)
    return CpuBatches(spec, device, channels_last)


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
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="default: on for CUDA, off for CPU")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--shards", type=Path, help="packed dataset (default: a synthetic one in a temp folder)")
    parser.add_argument("--ray-overhead", action="store_true", help="also measure rp2k train (1 Ray worker) vs the engine")
    parser.add_argument("--ray-epochs", type=int, default=3)
    parser.add_argument("--only-ray-overhead", action="store_true", help="skip modes (a)-(c)")
    parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True, help="mode (t), timm's step")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True, help="modes (b) and (c)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.crop_size = args.crop_size or (input_spec(args.model).crop_size if cuda else 64)
    args.batch_size = args.batch_size or (256 if cuda else 32)
    args.steps = args.steps or (50 if cuda else 8)
    if args.channels_last is None:
        args.channels_last = cuda
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp), classes=48, per_class=60, image_size=400 if cuda else 160)
        manifest = Manifest.load(shards)
        spec = input_spec(args.model, args.crop_size)
        classes = manifest.num_classes
        engine = EngineStep(args, classes, manifest.class_counts("train"), device)
        modes = {"a_compute_bound": lambda: timed(engine, synthetic(args.batch_size, args.crop_size, classes, device, args.channels_last), unchanged, args.warmup, args.steps)}
        if args.timm and importlib.util.find_spec("timm") is not None:
            peer = TimmStep(args, classes, device, engine.config)
            modes["t_timm_step"] = lambda: timed(peer, synthetic(args.batch_size, args.crop_size, classes, device, args.channels_last), unchanged, args.warmup, args.steps)
        elif args.timm:
            print("  timm is not installed: no side-by-side (pip install timm)")
        if args.pipeline:
            modes["b_cpu_decode"] = lambda: timed(engine, from_shards(manifest, spec, args.batch_size, args.workers, device, False), prepare_for(spec, device, False, args.channels_last), args.warmup, args.steps)
            modes["c_device_decode"] = lambda: timed(engine, from_shards(manifest, spec, args.batch_size, args.workers, device, True), prepare_for(spec, device, True, args.channels_last), args.warmup, args.steps)
        results: dict[str, list[float]] = {name: [] for name in modes}
        per_cpu: dict[str, list[float]] = {name: [] for name in modes}
        for repeat in range(0 if args.only_ray_overhead else args.repeats):  # interleaved, the order reversed every other repeat
            for name in (list(modes) if repeat % 2 == 0 else list(modes)[::-1]):
                rate, rate_cpu = modes[name]()
                results[name].append(rate)
                per_cpu[name].append(rate_cpu)
                print(f"  repeat {repeat + 1}/{args.repeats}  {name:16s} {rate:9.1f} img/s  {rate_cpu:7.1f} img/CPU-s",
                      flush=True)
        summary: dict[str, float] = {k: statistics.median(v) for k, v in results.items() if v}
        pairs = (("a_compute_bound", "t_timm_step"), ("b_cpu_decode", "a_compute_bound"), ("c_device_decode", "a_compute_bound"))
        ratios = {f"{num}/{den}": statistics.median(n / d for n, d in zip(results[num], results[den]))
                  for num, den in pairs if results.get(num) and results.get(den)}
        if results.get("t_timm_step"):
            ratios["a_compute_bound/t_timm_step per CPU-s"] = statistics.median(
                n / d for n, d in zip(per_cpu["a_compute_bound"], per_cpu["t_timm_step"]))
        if args.ray_overhead:
            summary.update(ray_overhead(Path(shards), args, Path(tmp) / "runs"))
        name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} torch threads)"
        print(f"{args.model} @ {args.crop_size}px, batch {args.batch_size}, {name}, channels_last={args.channels_last}, "
              f"bf16={cuda}, compile={args.compile}, loader workers {args.workers}, torch {torch.__version__}, "
              f"{args.repeats} interleaved repeats (medians)")
        for key, value in summary.items():
            unit = "%" if key.endswith("_pct") else "img/s"
            print(f"  {key:18s} {value:9.1f} {unit}")
        for key, value in ratios.items():
            print(f"  {key:42s} {value:6.3f}  (median of per-repeat ratios)")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "device": name,
                                             **summary, "ratios": ratios}, indent=1))

if __name__ == "__main__":
    main()
