"""RP2K-style names: class folders (Chinese product names with sizes and brackets) and
image basenames."""

from __future__ import annotations

import numpy as np

from .config import ClassSpec, ImageSpec


def _folder_name(kind: str, brand: str, product: str, size: str, flavour: str) -> str:
    """RP2K-style class folder name: ``伊利纯牛奶（草莓味）250ml``, ``555（冰炫）``."""
    if kind == "tobacco":
        return f"{brand}（{flavour}）"
    if flavour:
        return f"{brand}{product}（{flavour}）{size}"
    return f"{brand}{product}{size}"


def _file_names(total: int, rng: np.random.Generator) -> list[str]:
    """Unique RP2K-style basenames: ``0716_7768``, ``0514_10877_0.99999917``."""
    serials = rng.choice(np.arange(1000, 1000 + 40 * total), size=total, replace=False)
    names = []
    for serial in serials:
        stem = f"{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}_{serial}"
        if rng.random() < 0.15:
            stem += f"_0.9999{int(rng.integers(0, 10**4)):04d}"
        names.append(stem)
    return names


def _relpath(spec: ClassSpec, image: ImageSpec) -> str:
    return f"all/{image.split}/{spec.folder}/{image.name}"
