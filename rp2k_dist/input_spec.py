"""What a model eats: the input spec a model declares and every transform is built from.

It lives outside both ``models`` and ``data`` because both need it: a model declares its
spec (timm's idea: no silent 224/299 mismatch), the transforms are derived from it, and
every checkpoint carries it so inference preprocesses exactly as evaluation did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/checkpoint form (lists, not tuples)."""
        return {"crop_size": self.crop_size, "resize_size": self.resize_size,
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        """The inverse of :meth:`to_dict`."""
        return cls(int(data["crop_size"]), int(data["resize_size"]), tuple(data["mean"]), tuple(data["std"]))
