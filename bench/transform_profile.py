"""Where TrainTransform's time goes: decode vs warp vs brightness vs to_tensor, per image.

Single process, one thread, on JPEGs read straight from packed shards (``--shards DIR``
with a manifest, or a small synthetic RP2K packed at ``PackConfig(shorter_side=320)`` in
a temp dir). Every stage runs over the same images, stages interleaved per repeat;
printed: median CPU ms per image (process CPU time: robust on a shared machine) and the
share of the full transform.

Also timed, as candidate replacements for the warp (same matrix, same output size):

* ``PIL resize(box) + paste``: the images without perspective (half of them at p=0.5)
  are an axis-aligned scale + shift, which ``Image.resize`` with a ``box`` does with a
  separable filter; the border is the fill colour of a canvas;
* ``cv2.warpPerspective + cv2.LUT``: only if OpenCV is importable (not a dependency of
  the project; e.g. ``pip install --target /tmp/cvpkg opencv-python-headless`` and
  ``PYTHONPATH=/tmp/cvpkg``).

    .venv/bin/python bench/transform_profile.py [--images 200] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import statistics
import tarfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from _common import (
    DecodeOnly, cv2, cv2_warp_to_tensor, machine_info, print_machine, print_table, save_json, synthetic_tree, workdir,
)
from rp2k_dist.data.augment import AugmentConfig, AugmentParams, apply, brightness_lut, output_to_source, sample_params
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.transforms import InputSpec, TrainTransform, decode, to_tensor


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
    """The warp exactly as :func:`apply` does it (without the brightness step)."""
    matrix, size = output_to_source(params, resize, crop)
    return image.transform(size, Image.Transform.PERSPECTIVE, tuple(matrix.flatten()[:8]),
                           Image.Resampling.BILINEAR, fillcolor=params.fill)


def resize_box_warp(image: Image.Image, params: AugmentParams, resize: int, crop: int) -> Image.Image:
    """Border + crop + resize + centre crop without perspective, as one ``resize(box=...)``
    of the covered source region pasted on a canvas of the fill colour."""
    matrix, size = output_to_source(params, resize, crop)
    scale, x0, y0 = matrix[0, 0], matrix[0, 2], matrix[1, 2]
    box = (x0, y0, x0 + size[0] * scale, y0 + size[1] * scale)
    inner = (max(0.0, box[0]), max(0.0, box[1]), min(image.width, box[2]), min(image.height, box[3]))
    out_w, out_h = round((inner[2] - inner[0]) / scale), round((inner[3] - inner[1]) / scale)
    part = image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=inner)
    if part.size == size:
        return part
    canvas = Image.new("RGB", size, params.fill)
    canvas.paste(part, (round((inner[0] - box[0]) / scale), round((inner[1] - box[1]) / scale)))
    return canvas


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
    params = [sample_params(rng, im.width, im.height, augment) for im in images]
    pairs = list(zip(images, params))
    warped = [pil_warp(im, p, args.resize, args.crop) for im, p in pairs]
    flat = [(im, p) for im, p in pairs if p.perspective is None]  # the no-perspective half
    sizes = np.array([im.size for im in images])
    print(f"{len(jpegs)} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.1f} kB, "
          f"mean size {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px; "
          f"{len(flat)} without perspective; cv2: {cv2.__version__ if cv2 else 'not installed (skipped)'}", flush=True)

    stages: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
        "TrainTransform (b), full": (lambda j: full(j, rng), jpegs),
        "decode-only (c)": (lambda j: bound(j, rng), jpegs),
        "  decode (PIL, to RGB)": (decode, jpegs),
        "  sample_params + matrix": (lambda im: output_to_source(
            sample_params(rng, im.width, im.height, augment), args.resize, args.crop), images),
        "  warp: PIL transform PERSPECTIVE": (lambda ip: pil_warp(*ip, args.resize, args.crop), pairs),
        "  brightness: Image.point LUT": (lambda im: im.point(brightness_lut(1.1).tolist() * 3), warped),
        "  to_tensor": (to_tensor, warped),
        "  apply() (warp+brightness)": (lambda ip: apply(*ip, args.resize, args.crop), pairs),
        "no-persp.: PIL transform": (lambda ip: pil_warp(*ip, args.resize, args.crop), flat),
        "no-persp.: PIL resize(box)+paste": (lambda ip: resize_box_warp(*ip, args.resize, args.crop), flat),
    }
    if cv2 is not None:
        arrays = [(np.asarray(im), p) for im, p in pairs]
        stages["alt: cv2 warp+LUT+tensor"] = (lambda ap: cv2_warp_to_tensor(*ap, args.resize, args.crop), arrays)
        stages["  (PIL apply+to_tensor, same)"] = (lambda ip: to_tensor(apply(*ip, args.resize, args.crop)), pairs)

    fidelity = None
    if cv2 is not None:  # the candidate must compute the same image
        diffs = [(cv2_warp_to_tensor(a, p, args.resize, args.crop).int()
                  - to_tensor(apply(im, p, args.resize, args.crop)).int()).abs() for (a, p), im in zip(arrays, images)]
        fidelity = {"mean_abs_diff": float(np.mean([d.float().mean() for d in diffs])),
                    "p99_abs_diff": float(np.percentile(torch.cat([d.flatten() for d in diffs]).numpy(), 99)),
                    "max_abs_diff": int(max(d.max() for d in diffs))}
        print("cv2 vs PIL output, uint8 levels: mean |diff| {mean_abs_diff:.2f}, 99th pct {p99_abs_diff:.0f}, "
              "max {max_abs_diff}".format(**fidelity))

    times: dict[str, list[float]] = {name: [] for name in stages}
    names = list(stages)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            fn, items = stages[name]
            times[name].append(per_image_ms(fn, items))
    med = {name: statistics.median(v) for name, v in times.items()}
    whole = med["TrainTransform (b), full"]
    print()
    print_table([[name, med[name], med[name] / whole, " ".join(f"{t:.3f}" for t in times[name])] for name in names],
                ["stage", "CPU ms/img (median)", "of full", "per repeat"])
    print(f"\ntransform-level bound on (b)/(c): {med['decode-only (c)'] / whole:.3f} "
          f"(loader overheads come on top of both)")
    save_json(args.json, {"benchmark": "transform_profile", "args": vars(args), "machine": info,
                          "images": len(jpegs), "ms_per_image": times, "median_ms": med,
                          "cv2_fidelity": fidelity})


if __name__ == "__main__":
    main()
