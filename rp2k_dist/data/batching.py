"""Batches from a reader's stream of decoded samples: plain batches of a fixed size, or API-Net's
class-balanced P x K batches."""

from __future__ import annotations

import numpy as np


def _plain_batches(decoded, batch_size: int, partial: bool):
    images, labels, keys = [], [], []
    for image, label, key in decoded:
        images.append(image)
        labels.append(label)
        keys.append(key)
        if len(images) == batch_size:
            yield images, labels, keys
            images, labels, keys = [], [], []
    if images and partial:
        yield images, labels, keys


def _class_balanced_batches(decoded, classes_per_batch: int, per_class: int, rng: np.random.Generator):
    """P x K batches from a stream: P classes, up to K distinct images each (API-Net's sampler).

    Images wait in per-class pools. A batch is drawn once at least P classes hold two or
    more images (an intra-class pair needs two) and, while the stream still flows, half of
    them hold K; its P classes are drawn uniformly among those. Each class gives K images,
    or all it holds when that is fewer (at least 2): no image appears twice in a batch (a
    copy would be its own nearest intra-class partner at distance 0 and teach API-Net's
    ranking loss nothing), so a batch holds between 2P and P x K images. A class with one
    waiting image waits for a second; classes that never gather two images in a reader's
    stream cannot take part. Every image is used at most once per pass.
    """
    pools: dict[int, list] = {}

    def ready() -> list[int]:
        return sorted(c for c, pool in pools.items() if len(pool) >= 2)

    def draw(candidates: list[int]):
        chosen = rng.choice(candidates, size=classes_per_batch, replace=False)
        images, labels, keys = [], [], []
        for c in chosen:
            pool = pools[int(c)]
            for _ in range(min(per_class, len(pool))):
                image, key = pool.pop(int(rng.integers(len(pool))))
                images.append(image)
                labels.append(int(c))
                keys.append(key)
        return images, labels, keys

    for image, label, key in decoded:
        pools.setdefault(label, []).append((image, key))
        candidates = ready()
        full = sum(len(pools[c]) >= per_class for c in candidates)
        if len(candidates) >= classes_per_batch and full >= classes_per_batch // 2:
            yield draw(candidates)
    while len(candidates := ready()) >= classes_per_batch:  # the stream ended: use what waits
        yield draw(candidates)
