"""Per-model input specs and the sample transforms derived from them.

A model declares its :class:`InputSpec` (timm's idea: no silent 224/299 mismatch); the
training and evaluation transforms are built from it. Transforms run in loader workers
and return ``uint8`` CHW tensors: four times less inter-process traffic than float, and
normalisation happens on the device (:func:`normalize`), fused with the dtype cast.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .augment import AugmentConfig, AugmentParams, apply_array, sample_params
from .images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """What a model eats: square ``crop_size`` crops of images whose shorter side was
    resized to ``resize_size``, normalised with ``mean``/``std`` (0..1 scale)."""

    crop_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 16 <= self.crop_size <= self.resize_size:
            raise ValueError(
                f"need 16 <= crop_size <= resize_size, got crop {self.crop_size}, resize {self.resize_size}"
            )

    def scaled(self, crop_size: int) -> "InputSpec":
        """The same spec at another resolution (keeps the resize/crop ratio)."""
        ratio = self.resize_size / self.crop_size
        return InputSpec(crop_size, round(crop_size * ratio), self.mean, self.std)


def decode(jpeg: bytes) -> Image.Image:
    """Decode shard image bytes to RGB (raises PIL/OS errors on corrupt bytes)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image.load()
        return to_rgb(image)


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """HWC uint8 image -> contiguous CHW uint8 tensor."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


class TrainTransform:
    """Decode -> paper augmentations -> resize + centre crop, one resampling pass."""

    def __init__(self, spec: InputSpec, augment: AugmentConfig):
        self.spec = spec
        self.augment = augment

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> torch.Tensor:
        image = decode(jpeg)
        params = sample_params(rng, image.width, image.height, self.augment)
        return to_tensor(apply_array(np.asarray(image), params, self.spec.resize_size, self.spec.crop_size))


class EvalTransform:
    """Decode -> resize shorter side -> centre crop (the same geometry as training)."""

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = decode(jpeg)
        params = AugmentParams(0, (0, 0, 0), (0, 0, image.width, image.height), None, 1.0)
        return to_tensor(apply_array(np.asarray(image), params, self.spec.resize_size, self.spec.crop_size))


def normalize(images: torch.Tensor, spec: InputSpec, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 NCHW batch (on any device) -> normalised float batch of ``dtype``."""
    mean = torch.tensor(spec.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(spec.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255)
    return ((images.float() - mean) * inv_std).to(dtype)


class RawJpeg:
    """No decoding in the loader workers: pass the JPEG bytes on for device decoding.

    Only a cheap framing check (start and end markers) happens here, so truncated images
    are counted and skipped in the worker like any other corrupt sample.
    """

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> bytes:
        if jpeg[:2] != b"\xff\xd8" or b"\xff\xd9" not in jpeg[-16:]:
            raise ValueError("not a complete JPEG (missing start or end marker)")
        return jpeg
