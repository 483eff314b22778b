"""The validation split carved from train (``data.holdout``): held out of training, used to
choose the ensemble's routing threshold without looking at the test split.

Which images are held out is a pure function of the train split's keys, labels and the
fraction: within each class the images are ordered by a hash of their key and the first
``floor(n * fraction + 0.5)`` are held out, leaving at least 2 in train (an API-Net
intra-class pair needs 2). So the general model and every specialist of a dataset hold out
the same images, whatever the shard layout, the world size or the class subset.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError

#: Name of the held-out part of train, usable wherever a split name is (loaders, predictions).
HOLDOUT = "holdout"


def _rank_of(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


def held_out_count(n: int, fraction: float) -> int:
    """Images of a class of ``n`` train images held out: ``floor(n * fraction + 0.5)``,
    at most ``n - 2``."""
    return max(0, min(math.floor(n * fraction + 0.5), n - 2))


def holdout_mask(keys: Sequence[str], labels: Sequence[int], fraction: float) -> np.ndarray:
    """bool [N]: which train samples are held out (see the module docstring)."""
    if not 0.0 <= fraction < 0.5:
        raise ConfigError(f"data.holdout must be in [0, 0.5), got {fraction}")
    mask = np.zeros(len(keys), dtype=bool)
    if fraction == 0:
        return mask
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[int(label)].append(i)
    for rows in by_class.values():
        rows.sort(key=lambda i: (_rank_of(str(keys[i])), str(keys[i])))
        mask[rows[: held_out_count(len(rows), fraction)]] = True
    return mask
