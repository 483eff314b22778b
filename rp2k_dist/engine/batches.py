"""Turn a loader batch into model input on the device, for either data path.

CPU path: the loader workers decoded and augmented; here only the uint8 -> normalised
float step runs, on the device. Device path: the workers passed JPEG bytes; decode and
augmentation run here as batched tensor ops (:mod:`rp2k_dist.data.device_transforms`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import AugmentConfig
from ..data.device_transforms import DeviceBatchTransform, decode_batch
from ..data.images import DECODE_ERRORS
from ..data.transforms import normalize
from ..input_spec import InputSpec


class CpuBatches:
    def __init__(self, spec: InputSpec, device: torch.device, channels_last: bool):
        self.spec, self.device = spec, device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(normalised images, labels) on the device, and the samples' keys."""
        images = normalize(batch["image"].to(self.device, non_blocking=True), self.spec, memory_format=self.memory_format)
        labels = batch["label"].to(self.device, non_blocking=True)
        return images, labels, batch["key"]


class DeviceBatches:
    """Decode + augment on the device, each image with the augmentation seed the loader sent.
    A JPEG that fails to decode (the batch call raises) is found by decoding one by one and
    dropped, with its label; ``skipped`` counts them."""

    def __init__(self, spec: InputSpec, augment: AugmentConfig | None, device: torch.device, channels_last: bool):
        self.transform = DeviceBatchTransform(spec, augment, device)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.skipped = 0

    def __call__(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(normalised images, labels) on the device, and the keys of the images kept."""
        jpegs, labels, keys, seeds = batch["jpeg"], batch["label"], batch["key"], batch.get("seed")
        try:
            images = self.transform(jpegs, seeds)
        except (RuntimeError, *DECODE_ERRORS):
            keep = []
            for index, jpeg in enumerate(jpegs):
                try:
                    decode_batch([jpeg], self.device)
                    keep.append(index)
                except (RuntimeError, *DECODE_ERRORS):
                    self.skipped += 1
            images = self.transform([jpegs[i] for i in keep], None if seeds is None else [seeds[i] for i in keep])
            labels, keys = labels[keep], [keys[i] for i in keep]
        return images.contiguous(memory_format=self.memory_format), labels.to(self.device, non_blocking=True), keys
