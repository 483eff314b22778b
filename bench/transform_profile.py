"""Where TrainTransform's time goes, per image: decode, pixel hand-over, parameters,
warp, brightness, batching.

Single process, one thread, on JPEGs read straight from packed shards (``--shards DIR``
with a manifest, or a small synthetic RP2K packed at ``PackConfig(shorter_side=320)`` in
a temp dir). Every stage runs over the same images, stages interleaved per repeat;
printed: median CPU ms per image (process CPU time: robust on a shared machine) and the
share of the full transform.

Two rows are the alternatives the pipeline replaced, kept for the record: the Pillow
perspective warp (``Image.transform``) it used first, and ``np.asarray`` on the decoded
image (a full repacking copy) instead of :func:`~rp2k_dist.data.transforms.pixels`.
One row runs the full transform as the loader does, with a generator made per sample
(:func:`~rp2k_dist.data.augment.augment_seed` + ``augment_rng``), against one shared one.

    .venv/bin/python bench/transform_profile.py [--images 200] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

from _common import DecodeOnly, machine_info, print_machine, print_table, save_json, synthetic_tree, workdir
from rp2k_dist.data.augment import (
    AugmentConfig, AugmentParams, apply_array, augment_rng, augment_seed, output_to_source, sample_params,
)
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.transforms import InputSpec, TrainTransform, decode, pixels, stack_images, to_tensor

_CENTRES = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]), np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])


def read_jpegs(manifest: Manifest, count: int) -> list[bytes]:
    """The first ``count`` JPEGs of the train shards."""
    out: list[bytes] = []
    for path in manifest.shard_paths("train"):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    out.append(tar.extractfile(member).read())
                    if len(out) == count:
                        return out
    return out


def pil_warp(image: Image.Image, params: AugmentParams, resize: int, crop: int) -> Image.Image:
    """The warp as the first version did it: Pillow's generic perspective resampler."""
    matrix, size = output_to_source(params, resize, crop)
    return image.transform(size, Image.Transform.PERSPECTIVE, tuple(matrix.flatten()[:8]),
                           Image.Resampling.BILINEAR, fillcolor=params.fill)


def cv2_warp(array: np.ndarray, params: AugmentParams, resize: int, crop: int) -> np.ndarray:
    """The warp step of :func:`apply_array` alone (no padding-byte drop, no brightness)."""
    matrix, size = output_to_source(params, resize, crop)
    return cv2.warpPerspective(array, _CENTRES[0] @ matrix @ _CENTRES[1], size,
                               flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=params.fill)


def per_image_ms(fn: Callable[[Any], Any], items: Sequence[Any]) -> float:
    """Mean CPU milliseconds of ``fn`` per item. CPU time, not wall time: everything here
    runs in this one thread, and CPU time barely moves when other jobs share the cores."""
    start = time.process_time()
    for item in items:
        fn(item)
    return (time.process_time() - start) / len(items) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", help="a packed dataset (default: synthesise and pack a small one)")
    parser.add_argument("--images", type=int, default=200, help="JPEGs to run every stage on")
    parser.add_argument("--image-size", type=int, default=640, help="synthetic photos' longer side, px")
    parser.add_argument("--shorter-side", type=int, default=320, help="PackConfig.shorter_side")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", help="keep the synthetic data here and reuse it (default: temp dir)")
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(1)
    info = machine_info()
    print_machine(info)
    with workdir(args.workdir, "bench-transform-") as work:
        if args.shards:
            manifest = Manifest.load(args.shards)
        else:
            classes = 16
            per_class = max(4, -(-3 * args.images // (2 * classes)))  # sizes are long-tailed: ask for 1.5x
            tree = synthetic_tree(work / f"synth-{classes}x{per_class}-{args.image_size}",
                                  classes, per_class, args.image_size)
            manifest = pack_dataset(scan_rp2k(tree), work / f"shards-{args.image_size}-{args.shorter_side}",
                                    PackConfig(shorter_side=args.shorter_side, workers=1))
        jpegs = read_jpegs(manifest, args.images)

    rng = np.random.default_rng(0)
    spec, augment = InputSpec(args.crop, args.resize), AugmentConfig()
    full, bound = TrainTransform(spec, augment), DecodeOnly(args.crop)
    images = [decode(j) for j in jpegs]
    arrays = [pixels(im) for im in images]
    params = [sample_params(rng, im.width, im.height, augment) for im in images]
    warped = [cv2_warp(a, p, args.resize, args.crop) for a, p in zip(arrays, params)]
    rgb = [cv2.cvtColor(w, cv2.COLOR_RGBA2RGB) if w.shape[2] == 4 else w for w in warped]
    tensors = [to_tensor(x) for x in rgb]
    sizes = np.array([im.size for im in images])
    print(f"{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB, "
          f"mean size {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px; "
          f"pixels() hands over {arrays[0].shape[2]} channels; OpenCV {cv2.__version__}", flush=True)

    def batched(items: Sequence[torch.Tensor]) -> None:
        for start in range(0, len(items), 64):
            stack_images(list(items[start:start + 64]))

    keys = [f"train-{i:07d}" for i in range(len(jpegs))]
    seeded = lambda k: augment_rng(augment_seed(0, 1, 0, k))  # what the loader gives each sample
    stages: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "TrainTransform (b), full": (lambda j: full(j, rng), jpegs),
        "TrainTransform, generator per sample": (lambda jk: full(jk[0], seeded(jk[1])), list(zip(jpegs, keys))),
        "decode-only (c)": (lambda j: bound(j, rng), jpegs),
        "  decode (PIL, to RGB)": (decode, jpegs),
        "  pixels(): zero-copy view": (pixels, images),
        "  augment_seed + augment_rng": (seeded, keys),
        "  sample_params + matrix": (lambda im: output_to_source(
            sample_params(rng, im.width, im.height, augment), args.resize, args.crop), images),
        "  warp: cv2.warpPerspective": (lambda ap: cv2_warp(*ap, args.resize, args.crop), list(zip(arrays, params))),
        "  drop padding byte (cvtColor)": (lambda w: cv2.cvtColor(w, cv2.COLOR_RGBA2RGB) if w.shape[2] == 4 else w, warped),
        "  brightness (convertScaleAbs)": (lambda x: cv2.convertScaleAbs(x, alpha=1.1), rgb),
        "  to_tensor (a view)": (to_tensor, rgb),
        "  apply_array (the last four)": (lambda ap: apply_array(*ap, args.resize, args.crop), list(zip(arrays, params))),
        "batching: stack_images, per image": (None, tensors),
        "was: np.asarray(image) (a copy)": (np.asarray, images),
        "was: PIL perspective warp": (lambda ip: pil_warp(*ip, args.resize, args.crop), list(zip(images, params))),
    }

    times: dict[str, list[float]] = {name: [] for name in stages}
    names = list(stages)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, items = stages[name]
            if fn is None:  # whole batches of 64
                start = time.process_time()
                batched(items)
                times[name].append((time.process_time() - start) / len(items) * 1e3)
            else:
                times[name].append(per_image_ms(fn, items))
    med = {name: statistics.median(v) for name, v in times.items()}
    whole = med["TrainTransform (b), full"]
    print()
    print_table([[name, med[name], med[name] / whole, " ".join(f"{t:.3f}" for t in times[name])] for name in names],
                ["stage", "CPU ms/img (median)", "of full", "per repeat"])
    print(f"\ntransform-level bound on (b)/(c): {med['decode-only (c)'] / whole:.3f} "
          f"(loader overheads come on top of both)")
    per_sample = statistics.median(s / w for s, w in zip(times["TrainTransform, generator per sample"],
                                                         times["TrainTransform (b), full"]))
    print(f"TrainTransform with a generator per sample / with one shared generator: {per_sample:.3f} "
          "(median of per-repeat ratios)")
    save_json(args.json, {"benchmark": "transform_profile", "args": vars(args), "machine": info,
                          "images": len(jpegs), "ms_per_image": times, "median_ms": med})


if __name__ == "__main__":
    main()
