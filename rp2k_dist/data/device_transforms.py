"""The data path on the accelerator: batched JPEG decode and the paper's augmentations as
tensor ops on the device.

CPU JPEG decode (~400-600 img/s per core) starves a modern GPU. On the device path the
loader workers only read tar members and hand over the raw JPEG bytes; the training
process decodes the whole batch with ``torchvision.io.decode_jpeg(..., device="cuda")``
(nvJPEG), then applies border + crop + perspective + resize + centre crop as ONE
``grid_sample`` per image, driven by the same projective matrix as the CPU path
(:func:`rp2k_dist.data.augment.output_to_source`) with parameters from the same sampler
(:func:`rp2k_dist.data.augment.sample_params`), seeded per sample by the seed the loader
sends with each image (:func:`rp2k_dist.data.augment.augment_seed`): a sample gets the same
parameters on either path. Brightness and normalisation are fused into the final multiply-add.
The same code runs on the CPU (``device="cpu"``), which is how it is tested here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .augment import AugmentConfig, AugmentParams, augment_rng, output_to_source, sample_params
from ..input_spec import InputSpec


def decode_batch(jpegs: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> list of uint8 [3, H, W] tensors on ``device`` (batched nvJPEG on CUDA)."""
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def sampling_grid(matrix: np.ndarray, size: tuple[int, int], source: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``grid_sample`` grid [1, h, w, 2] for an output->source projective ``matrix``.

    Pixel ``i`` covers [i, i+1); normalised coordinates follow ``align_corners=False``.
    """
    width, height = size
    src_w, src_h = source
    m = torch.as_tensor(matrix, dtype=torch.float32, device=device)
    v, u = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32) + 0.5,
                          torch.arange(width, device=device, dtype=torch.float32) + 0.5, indexing="ij")
    points = torch.stack([u, v, torch.ones_like(u)], dim=-1) @ m.T  # [h, w, 3]
    xy = points[..., :2] / points[..., 2:]
    scale = torch.tensor([2.0 / src_w, 2.0 / src_h], device=device)
    return (xy * scale - 1.0).unsqueeze(0)


def warp(image: torch.Tensor, params: AugmentParams, resize: int | None, crop_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [3, H, W] -> (float [3, h, w] in 0..255 with the fill colour outside the
    source, coverage mask [1, h, w]). Same geometry as :func:`augment.apply`."""
    matrix, size = output_to_source(params, resize, crop_size)
    grid = sampling_grid(matrix, size, (image.shape[2], image.shape[1]), image.device)
    source = torch.cat([image.float(), torch.full_like(image[:1], 1, dtype=torch.float32)]).unsqueeze(0)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    rgb, coverage = out[:3], out[3:]
    fill = torch.tensor(params.fill, dtype=torch.float32, device=image.device).view(3, 1, 1)
    return rgb + fill * (1 - coverage), coverage


class DeviceBatchTransform:
    """JPEG bytes of a batch -> normalised float [N, 3, S, S] on ``device``.

    ``augment=None`` gives the evaluation geometry (resize shorter side + centre crop);
    magnitudes given as fractions of the crop are resolved for ``spec.crop_size``.
    With augmentation each image needs its seed (the loader batch's ``"seed"``).
    """

    def __init__(self, spec: InputSpec, augment: AugmentConfig | None, device: torch.device):
        self.spec = spec
        self.augment = augment.in_pixels(spec.crop_size) if augment is not None else None
        self.device = torch.device(device)
        mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1) * 255
        self.scale, self.shift = 1.0 / std, -mean / std

    def params(self, width: int, height: int, seed: int | None) -> AugmentParams:
        """One ``width`` x ``height`` image's parameters, drawn as the CPU path draws them."""
        if self.augment is None:
            return AugmentParams(0, (0, 0, 0), (0, 0, width, height), None, 1.0)
        if seed is None:
            raise ValueError("device augmentation needs each image's seed (the loader batch's 'seed')")
        return sample_params(augment_rng(seed), width, height, self.augment)

    def __call__(self, jpegs: list[bytes], seeds: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``seeds``: one augmentation seed per image (unused without augmentation)."""
        if seeds is not None and len(seeds) != len(jpegs):
            raise ValueError(f"{len(seeds)} seeds for {len(jpegs)} images")
        images = decode_batch(jpegs, self.device)
        out, brightness = [], []
        for index, image in enumerate(images):
            params = self.params(image.shape[2], image.shape[1], None if seeds is None else seeds[index])
            rgb, _ = warp(image, params, self.spec.resize_size, self.spec.crop_size)
            out.append(rgb)
            brightness.append(params.brightness)
        batch = torch.stack(out)
        factor = torch.tensor(brightness, device=self.device).view(-1, 1, 1, 1)
        # brightness, then clamp as uint8 pixels would be, then normalise: one fused pass
        batch = (batch * factor).clamp_(0, 255).mul_(self.scale).add_(self.shift)
        return batch.to(dtype)
