"""The paper's four augmentations, fused into one resampling pass.

The paper imitates blurry shop photos with (1) a constant-colour border of random width
0..30 px, (2) a random crop of up to 10 px, (3) a random perspective transform and (4) a
brightness change within +-20 %. (1)-(3) and the model's resize + centre crop are all
projective maps of the plane, so they compose into ONE 3x3 matrix and the image is
resampled once (``cv2.warpPerspective``); the border is simply the fill colour of pixels
that map outside the source image. (4) is one saturating multiply. The same parameters
drive the GPU path (:mod:`rp2k_dist.data.device_transforms`).

Parameter ranges (each switchable, magnitude configurable):

* border: one width ``b ~ U{0..border_max}`` on all four sides, colour ``border_fill``
  (``"random"``: a uniform random RGB per image; or a grey level 0..255);
* crop: each dimension shrinks by ``d ~ U{0..crop_max}`` px, window at a random offset;
* perspective: with probability ``perspective_p``, each corner moves inward by up to
  ``perspective_scale`` x half the width/height (torchvision ``RandomPerspective``);
* brightness: pixel values times ``f ~ U[1 - brightness_max, 1 + brightness_max]``.

``border_max`` / ``crop_max`` may be given as fractions of the model's crop side
(``augment.border_max_frac`` / ``crop_max_frac``); the transforms turn them into pixels for
their input spec (:meth:`AugmentConfig.in_pixels`) before any parameter is drawn.

Each sample's draws come from its own generator, seeded by :func:`augment_seed` from the run
seed, the epoch, the pass and the sample's key only: a sample gets the same augmentation
at any world size and number of loader workers, after a mid-epoch resume, and on either
data path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ..config import AugmentConfig

cv2.setNumThreads(1)  # loader workers are the parallelism; no thread pool per worker

Point = tuple[float, float]


@dataclass(frozen=True)
class AugmentParams:
    """Random draws for one image. Coordinates are in the bordered image's pixels."""

    border: int
    fill: tuple[int, int, int]
    crop: tuple[int, int, int, int]  # left, top, width, height of the window
    perspective: tuple[Point, Point, Point, Point] | None  # where the window's corners go
    brightness: float


def augment_seed(seed: int, epoch: int, draw: int, key: str) -> int:
    """The 64-bit seed of one sample's augmentation in one epoch.

    A BLAKE2b digest (stable across processes and Python versions, unlike ``hash()``) of
    the run ``seed``, the ``epoch``, the ``draw`` (0 for an epoch's planned pass; a pass
    that reads a sample again in the same epoch gets its own number) and the sample's
    ``key``. The rank, the loader worker and the world size are deliberately not inputs.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{draw}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def augment_rng(seed: int) -> np.random.Generator:
    """The generator :func:`sample_params` draws one sample's parameters from (PCG64)."""
    return np.random.default_rng(seed)


def sample_params(
    rng: np.random.Generator, width: int, height: int, config: AugmentConfig
) -> AugmentParams:
    """Draw the augmentation parameters for a ``width`` x ``height`` image (``config`` in
    pixels: fractions resolved by :meth:`AugmentConfig.in_pixels`)."""
    if config.border_max_frac is not None or config.crop_max_frac is not None:
        raise ValueError("augment.*_max_frac must be resolved to pixels first: AugmentConfig.in_pixels(crop_size)")
    border = int(rng.integers(0, config.border_max + 1)) if config.border else 0
    if config.border_fill == "random":
        fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    else:
        fill = (int(config.border_fill),) * 3
    w, h = width + 2 * border, height + 2 * border
    left = top = 0
    if config.crop:
        dx = int(rng.integers(0, min(config.crop_max, w - 1) + 1))
        dy = int(rng.integers(0, min(config.crop_max, h - 1) + 1))
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        w, h = w - dx, h - dy
    perspective = None
    if config.perspective and rng.random() < config.perspective_p:
        mx, my = config.perspective_scale * w / 2, config.perspective_scale * h / 2
        jx, jy = rng.uniform(0, mx, size=4), rng.uniform(0, my, size=4)
        perspective = (
            (jx[0], jy[0]),
            (w - 1 - jx[1], jy[1]),
            (w - 1 - jx[2], h - 1 - jy[2]),
            (jx[3], h - 1 - jy[3]),
        )
    brightness = 1.0
    if config.brightness:
        brightness = float(rng.uniform(1 - config.brightness_max, 1 + config.brightness_max))
    return AugmentParams(border, fill, (left, top, w, h), perspective, brightness)


def homography(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 3x3 matrix H with ``H @ [x, y, 1] ~ [x', y', 1]`` for four point pairs."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    solution = np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float))
    return np.append(solution, 1.0).reshape(3, 3)


def _translate(dx: float, dy: float) -> np.ndarray:
    return np.array([[1, 0, dx], [0, 1, dy], [0, 0, 1]], float)


def output_to_source(
    params: AugmentParams, resize: int | None = None, crop_size: int | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Matrix mapping output pixels to source pixels, and the output size.

    Without ``resize`` the output is the crop window itself (used by tests to check each
    augmentation's bounds); with it, the window is scaled so its shorter side is
    ``resize`` and centre-cropped to ``crop_size`` x ``crop_size``.
    """
    left, top, w, h = params.crop
    # output -> window coordinates
    if resize is None:
        to_window = np.eye(3)
        size = (w, h)
    else:
        crop_size = crop_size or resize
        scale = resize / min(w, h)
        ox, oy = (w * scale - crop_size) / 2, (h * scale - crop_size) / 2
        to_window = np.diag([1 / scale, 1 / scale, 1]) @ _translate(ox, oy)
        size = (crop_size, crop_size)
    # window after perspective -> window before perspective
    if params.perspective is not None:
        corners = np.array([(0, 0), (w - 1, 0), (w - 1, h - 1), (0, h - 1)], float)
        to_window = homography(np.asarray(params.perspective, float), corners) @ to_window
    # window -> bordered image -> source image
    matrix = _translate(left - params.border, top - params.border) @ to_window
    return matrix / matrix[2, 2], size


# Output->source matrices use PIL's convention (pixel i covers [i, i+1)); OpenCV puts pixel
# centres on integers. These shifts convert one into the other.
_TO_CENTRES = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
_FROM_CENTRES = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
_IDENTITY = np.eye(3)


def apply_array(
    image: np.ndarray,
    params: AugmentParams,
    resize: int | None = None,
    crop_size: int | None = None,
) -> np.ndarray:
    """Border + crop + perspective (+ resize and centre crop) in one bilinear resampling
    (``cv2.warpPerspective``), then brightness. HWC uint8 RGB in (3 channels, or 4 with
    Pillow's padding byte, see ``transforms.pixels``), contiguous HWC RGB out.

    The warp is OpenCV's rather than Pillow's generic perspective resampler: it is the
    largest cost of a training sample after the JPEG decode (bench/RESULTS.md).
    """
    matrix, size = output_to_source(params, resize, crop_size)
    # Shrinking by 2x or more: area-reduce first so bilinear sampling does not alias.
    shrink = int(abs(matrix[0, 0])) if resize is not None else 1
    if shrink >= 2:
        height, width = image.shape[:2]
        image = cv2.resize(image, (max(1, width // shrink), max(1, height // shrink)), interpolation=cv2.INTER_AREA)
        matrix = np.diag([1 / shrink, 1 / shrink, 1]) @ matrix
    identity = size == (image.shape[1], image.shape[0]) and float(np.abs(matrix - _IDENTITY).max()) < 1e-9
    if not identity:
        image = cv2.warpPerspective(
            image, _TO_CENTRES @ matrix @ _FROM_CENTRES, size,
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT, borderValue=params.fill,
        )
    if image.shape[2] == 4:  # drop Pillow's padding byte: contiguous RGB from here on
        image = cv2.cvtColor(image, cv2.COLOR_RGBA2RGB)
    if params.brightness != 1.0:  # round(x * f), saturated at 255: one SIMD pass
        image = cv2.convertScaleAbs(image, alpha=params.brightness)
    return image


def apply(
    image: Image.Image,
    params: AugmentParams,
    resize: int | None = None,
    crop_size: int | None = None,
) -> Image.Image:
    """:func:`apply_array` on a PIL RGB image."""
    return Image.fromarray(apply_array(np.asarray(image), params, resize, crop_size))
