"""Shared helpers of the benchmark scripts in ``bench/``.

Timing method: the machine is small (2 cores) and shared, so absolute numbers drift.
Every script measures a baseline and its candidates in the same run, interleaved
(baseline, candidate, ..., then the same again with the order reversed, ...), and
reports medians over the repeats plus the median of the per-repeat ratios (each ratio
taken between measurements made seconds apart).

Also here: the synthetic dataset the scripts run on, the torchvision baseline transforms
and the decode-only transform (top-level classes: loader workers unpickle them).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k
from rp2k_dist.data.transforms import TrainTransform, decode_array, to_tensor

# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model and count, load average, library versions: what RESULTS.md quotes."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import PIL
    import torchvision

    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def print_machine(info: Mapping[str, Any]) -> None:
    load = ", ".join(f"{v:.2f}" for v in info["load_avg_at_start"])
    print(
        f"machine: {info['cpus']} CPUs ({info['cpu_model']}), load avg {load}; "
        f"Python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
        f"Pillow {info['pillow']}; {info['date']}"
    )


# --------------------------------------------------------------------------- timing


@dataclass
class Series:
    """Repeated measurements of one mode: a rate (items/s) per repeat, plus extras."""

    name: str
    rates: list[float] = field(default_factory=list)
    extras: list[dict[str, float]] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def interleaved(
    modes: Mapping[str, Callable[[], tuple[float, dict[str, float]]]],
    repeats: int,
    verbose: bool = True,
) -> dict[str, Series]:
    """Run every mode once per repeat, in order, reversing the order every other repeat
    (A B C, C B A, A B C, ...): slow drifts of the machine's load hit all modes alike.

    Each callable returns ``(rate, extras)``.
    """
    names = list(modes)
    series = {name: Series(name) for name in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            rate, extras = modes[name]()
            series[name].rates.append(rate)
            series[name].extras.append(extras)
            if verbose:
                print(f"  repeat {r + 1}/{repeats}  {name:<28s} {rate:9.1f} img/s", flush=True)
    return series


def cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and every process under it:
    the live ones (loader workers, the forkserver) and the reaped ones (counted by the
    parent that waited for them, e.g. the forkserver for pool workers).

    Throughput per CPU second is much less sensitive than wall-clock throughput to other
    jobs on a shared machine. Returns NaN without psutil.
    """
    try:
        import psutil
    except ImportError:
        return float("nan")
    me = psutil.Process()
    times = me.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # exited between listing and reading
            continue
    return total


def settle(window: float = 0.25, idle_fraction: float = 0.05, timeout: float = 60.0) -> float:
    """Wait until this process's children are idle: CPU use of the process tree below
    ``idle_fraction`` of one core over a ``window``. Returns the seconds waited.

    Loaders kept alive between measurements keep working after one stops being read,
    until their prefetch queues are full (a slow loader: seconds of two busy cores).
    Without this wait that work lands in the next mode's measurement.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        before = cpu_seconds()
        time.sleep(window)
        if cpu_seconds() - before < idle_fraction * window:
            break
    return time.perf_counter() - start


def paired_ratio(num: Series, den: Series) -> float:
    """Median over repeats of ``num / den`` measured in the same repeat."""
    return statistics.median(n / d for n, d in zip(num.rates, den.rates))


def print_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for j, row in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def save_json(path: str | Path | None, payload: Mapping[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"results written to {path}")


# --------------------------------------------------------------------------- data


@contextmanager
def workdir(path: str | None, prefix: str) -> Iterator[Path]:
    """``path`` if given (created, kept, reused between runs), else a temp dir removed at exit."""
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def synthetic_tree(root: Path, classes: int, images_per_class: int, image_size: int, seed: int = 0) -> Path:
    """A clean (``quirks=False``, ImageFolder-compatible) synthetic RP2K under ``root``,
    reused when an earlier run left the same one there."""
    config = SynthConfig(classes=classes, images_per_class=images_per_class, image_size=image_size,
                         seed=seed, quirks=False, workers=0)
    marker = root / ".rp2k_synth.json"
    if marker.exists():
        settings = json.loads(marker.read_text(encoding="utf-8")).get("config", {})
        if all(settings.get(k) == v for k, v in
               {"classes": classes, "images_per_class": images_per_class, "image_size": image_size,
                "seed": seed, "quirks": False}.items()):
            return root
    start = time.perf_counter()
    summary = make_synthetic_rp2k(root, config)
    print(f"synthesised {summary.train_images} train + {summary.test_images} test images "
          f"(longer side {image_size} px) in {time.perf_counter() - start:.0f} s", flush=True)
    return root


def replicate_train(root: Path, copies: int) -> int:
    """Hard-link every train image ``copies - 1`` more times in its class folder (names
    ``<stem>__r<k><suffix>``): a bigger epoch without rendering more images. Decoding cost
    per image is unchanged. Returns the number of train files afterwards."""
    files = [p for p in (root / "all" / "train").glob("*/*") if p.is_file() and "__r" not in p.stem]
    for path in files:
        for k in range(1, copies):
            twin = path.with_name(f"{path.stem}__r{k}{path.suffix}")
            if not twin.exists():
                os.link(path, twin)
    return sum(1 for p in (root / "all" / "train").glob("*/*") if p.is_file())


# --------------------------------------------------------------------------- transforms


class DecodeOnly:
    """Upper bound of a sample transform: decode the JPEG as TrainTransform does (into
    Pillow's buffer, no copy), cut a centre ``size`` crop out as contiguous RGB (the
    cheapest way to the layout the batching copies fastest) and view it as CHW."""

    uses_rng = False  # draws nothing: the loader makes no per-sample generator for it

    def __init__(self, size: int = 224):
        self.size = size

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> torch.Tensor:
        array = decode_array(jpeg)
        top, left = (array.shape[0] - self.size) // 2, (array.shape[1] - self.size) // 2
        crop = array[top:top + self.size, left:left + self.size]
        return to_tensor(cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB) if crop.shape[2] == 4 else crop)


class WorkerRngTrain(TrainTransform):
    """TrainTransform drawing from one generator per loader worker (made on first use in
    the worker) instead of the per-sample one the loader offers: the baseline that shows
    what per-sample seeding costs. Its draws are not meant for training."""

    uses_rng = False
    _rng = None

    def __call__(self, jpeg: bytes, rng: None = None) -> torch.Tensor:
        if self._rng is None:
            self._rng = np.random.default_rng(0)
        return super().__call__(jpeg, self._rng)


class RandomBorder(torch.nn.Module):
    """Constant border of random width 0..``max_width`` px on all sides, random RGB
    (the paper's augmentation 1; torchvision's Pad takes a fixed width)."""

    def __init__(self, max_width: int = 30):
        super().__init__()
        self.max_width = max_width

    def forward(self, image):
        from torchvision.transforms.v2 import functional as F

        width = int(torch.randint(0, self.max_width + 1, ()).item())
        fill = [int(v) for v in torch.randint(0, 256, (3,))]
        return F.pad(image, [width], fill=fill) if width else image


class RandomShrinkCrop(torch.nn.Module):
    """Crop each dimension by 0..``max_px`` px at a random offset (augmentation 2)."""

    def __init__(self, max_px: int = 10):
        super().__init__()
        self.max_px = max_px

    def forward(self, image):
        from torchvision.transforms.v2 import functional as F

        width, height = F.get_size(image)[::-1]
        dx, dy = (int(v) for v in torch.randint(0, self.max_px + 1, (2,)))
        left = int(torch.randint(0, dx + 1, ()).item())
        top = int(torch.randint(0, dy + 1, ()).item())
        return F.crop(image, top, left, height - dy, width - dx)


def torchvision_train_transform(crop_size: int = 224, resize_size: int = 256):
    """The paper's augmentations with standard torchvision v2 transforms, on PIL images;
    uint8 CHW output like our loader's."""
    from torchvision.transforms import v2

    return v2.Compose([
        RandomBorder(30),
        RandomShrinkCrop(10),
        v2.RandomPerspective(distortion_scale=0.2, p=0.5),
        v2.ColorJitter(brightness=0.2),
        v2.Resize(resize_size),
        v2.CenterCrop(crop_size),
        v2.PILToTensor(),
    ])
