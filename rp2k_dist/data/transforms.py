"""The sample transforms derived from a model's :class:`~rp2k_dist.input_spec.InputSpec`.

A model declares its input spec (timm's idea: no silent 224/299 mismatch); the training
and evaluation transforms are built from it. Transforms run in loader workers
and return ``uint8`` CHW tensors: four times less inter-process traffic than float, and
normalisation happens on the device (:func:`normalize`), fused with the dtype cast.

No pixel is copied that need not be: decoding hands over Pillow's own buffer
(:func:`pixels`), the warp writes the output image, and the CHW tensor is a view of it;
the loader's batching then makes the one copy every pipeline needs (into shared memory).
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import get_worker_info

from ..input_spec import InputSpec
from .augment import AugmentConfig, AugmentParams, apply_array, sample_params
from .images import to_rgb

def decode(jpeg: bytes) -> Image.Image:
    """Decode shard image bytes to RGB (raises PIL/OS errors on corrupt bytes)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image.load()
        return to_rgb(image)


#: Pillow >= 11.2 exports images through the Arrow C data interface, without a copy.
_ARROW_EXPORT = hasattr(Image.Image, "__arrow_c_array__")


def pixels(image: Image.Image) -> np.ndarray:
    """An RGB image's pixels as an ``H x W x C`` uint8 array, ``C`` = 3 or 4.

    Pillow keeps RGB in 4 bytes per pixel; where it can export that buffer without a copy
    the array is a read-only view of it with the 4th (padding) byte left in place: every
    consumer here ignores channels past the third. ``np.asarray`` would instead repack
    the whole image, one more copy per sample on the loader's hottest path.
    """
    if _ARROW_EXPORT and image.mode == "RGB":
        try:
            flat = pa.array(image).flatten().to_numpy(zero_copy_only=True)
            return flat.reshape(image.height, image.width, 4)
        except (ValueError, pa.ArrowException):  # rows in several memory blocks (huge images)
            pass
    return np.asarray(image, dtype=np.uint8)


def decode_array(jpeg: bytes) -> np.ndarray:
    """Decode shard image bytes to RGB :func:`pixels` (raises PIL/OS errors on corrupt bytes)."""
    return pixels(decode(jpeg))


def to_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """HWC uint8 image (3 or 4 channels) -> CHW uint8 tensor of its first 3 channels.

    A view, not a copy (strides of an HWC array); :func:`stack_images` gathers the views
    of a batch with one copy.
    """
    array = np.asarray(image, dtype=np.uint8)
    if not array.flags.writeable:  # a decoder's read-only buffer: torch wants its own memory
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1)[:3]


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """CHW uint8 images -> one ``N x C x H x W`` batch stored channels-last.

    The images are views of HWC arrays, so gathering them into ``N x H x W x C`` memory
    is a plain row copy (a CHW-contiguous batch would need a transposing copy per
    image). Inside a loader worker the batch goes straight into shared memory, as in
    DataLoader's default collate, so handing it to the training process copies nothing.
    """
    first = images[0]
    channels, height, width = first.shape
    shape = (len(images), height, width, channels)
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(images) * height * width * channels)
        out = first.new(storage).view(shape)
    else:
        out = first.new_empty(shape)
    torch.stack([image.permute(1, 2, 0) for image in images], out=out)
    return out.permute(0, 3, 1, 2)


class TrainTransform:
    """Decode -> paper augmentations -> resize + centre crop, one resampling pass.
    Magnitudes given as fractions of the crop are resolved for ``spec.crop_size``. The
    parameters are drawn from ``rng``: the loader passes each sample its own generator
    (:func:`~rp2k_dist.data.augment.augment_rng`)."""

    def __init__(self, spec: InputSpec, augment: AugmentConfig):
        self.spec = spec
        self.augment = augment.in_pixels(spec.crop_size)

    def __call__(self, jpeg: bytes, rng: np.random.Generator) -> torch.Tensor:
        array = decode_array(jpeg)
        params = sample_params(rng, array.shape[1], array.shape[0], self.augment)
        return to_tensor(apply_array(array, params, self.spec.resize_size, self.spec.crop_size))


class EvalTransform:
    """Decode -> resize shorter side -> centre crop (the same geometry as training)."""

    uses_rng = False  # the loader makes no generator for it

    def __init__(self, spec: InputSpec):
        self.spec = spec

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> torch.Tensor:
        array = decode_array(jpeg)
        params = AugmentParams(0, (0, 0, 0), (0, 0, array.shape[1], array.shape[0]), None, 1.0)
        return to_tensor(apply_array(array, params, self.spec.resize_size, self.spec.crop_size))


def normalize(
    images: torch.Tensor,
    spec: InputSpec,
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 NCHW batch (on any device, any layout) -> normalised float batch of ``dtype``
    in ``memory_format`` (the layout change rides on the dtype cast: one pass)."""
    mean = torch.tensor(spec.mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    inv_std = 1.0 / (torch.tensor(spec.std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255)
    out = images.to(torch.float32, memory_format=memory_format, copy=True).sub_(mean).mul_(inv_std)
    return out if dtype == torch.float32 else out.to(dtype)


class RawJpeg:
    """No decoding in the loader workers: pass the JPEG bytes on for device decoding.

    Only a cheap framing check (start and end markers) happens here, so truncated images
    are counted and skipped in the worker like any other corrupt sample. The loader sends
    each image's augmentation seed with the batch instead of a generator.
    """

    uses_rng = False

    def __call__(self, jpeg: bytes, rng: np.random.Generator | None = None) -> bytes:
        if jpeg[:2] != b"\xff\xd8" or b"\xff\xd9" not in jpeg[-16:]:
            raise ValueError("not a complete JPEG (missing start or end marker)")
        return jpeg
