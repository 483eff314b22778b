"""Groups of near-duplicate images, so that a validation split holds whole bursts.

Product photos come in bursts: RP2K's crops are cut from shelf photos, several of one
product on one shelf, and a photographer takes several shots of one pack in a row. A
validation split drawn image by image then holds near-copies of training images and reads
far easier than test (whose photos are other shots). :mod:`.holdout` therefore draws the
validation split by groups found here.

* :func:`phash`: the 64-bit DCT perceptual hash of an image (Zauner, "Implementation and
  Benchmarking of Perceptual Image Hash Functions", 2010; the pHash library): the grey
  image shrunk to 32 x 32, its 8 x 8 lowest DCT frequencies, one bit each for "above the
  median". Near-copies (re-crops, shifts of a few pixels, JPEG noise, a little lighting)
  differ in a few bits, other shots of the same product in many: on planted bursts of
  shifted, noisy copies the most a burst's members differed was 12 bits and the least two
  bursts of one class differed was 20 (the difference hash, 9 x 8 neighbours, overlapped:
  19 and 17). ``rp2k pack`` stores it per sample (the ``phash`` column of ``index.parquet``).
* :func:`near_duplicate_groups`: within each class, images whose hashes differ in at most
  :data:`MAX_DISTANCE` bits are linked, and a group is a connected component (single
  linkage, so a burst that drifts shot by shot stays one group).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Bits (of 64) two images' hashes may differ in and still be near-duplicates.
MAX_DISTANCE = 12
_BLOCK = 1024  # rows of the pairwise distance matrix computed at once


def phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of ``image`` as a signed int64 (Parquet's integer)."""
    from scipy.fft import dctn

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BOX), dtype=np.float64)
    low = dctn(grey, norm="ortho")[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])  # the DC term (mean brightness) left out of the median
    value = int(np.packbits(bits).view(">u8")[0])
    return value - (1 << 64) if value >= 1 << 63 else value


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits differing between every hash of ``a`` [M] and every hash of ``b`` [N]: int [M, N]."""
    a = np.asarray(a, np.int64).view(np.uint64)
    b = np.asarray(b, np.int64).view(np.uint64)
    return np.bitwise_count(a[:, None] ^ b[None, :]).astype(np.int64)


def near_duplicate_groups(hashes: Sequence[int | None] | np.ndarray, labels: Sequence[int] | np.ndarray,
                          max_distance: int = MAX_DISTANCE) -> np.ndarray:
    """int64 [N]: a group id per image; images of one class whose hashes lie within
    ``max_distance`` bits of each other (transitively) share it. An image without a hash
    (None: packed by an older rp2k-dist) is a group of its own."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    labels = np.asarray(labels, np.int64)
    known = np.array([h is not None for h in hashes], dtype=bool)
    values = np.array([0 if h is None else int(h) for h in hashes], dtype=np.int64)
    groups = np.full(len(labels), -1, dtype=np.int64)
    next_id = 0
    for label in np.unique(labels):
        rows = np.flatnonzero((labels == label) & known)
        if len(rows) == 0:
            continue
        links_i, links_j = [], []
        for start in range(0, len(rows), _BLOCK):
            near = hamming(values[rows[start:start + _BLOCK]], values[rows]) <= max_distance
            i, j = np.nonzero(near)
            links_i.append(i + start)
            links_j.append(j)
        i, j = np.concatenate(links_i), np.concatenate(links_j)
        graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(len(rows), len(rows)))
        count, component = connected_components(graph, directed=False)
        groups[rows] = next_id + component
        next_id += count
    alone = np.flatnonzero(groups < 0)
    groups[alone] = next_id + np.arange(len(alone))
    return groups
