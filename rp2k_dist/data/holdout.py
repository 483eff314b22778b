"""What training never sees: the validation split carved from train (``data.holdout``),
used to choose the ensemble's routing threshold and the open-set threshold without looking
at the test split, and the unseen classes (``data.holdout_classes``,
:func:`held_out_classes`), whose images stay out of training altogether.

Which images are held out is a pure function of the train split's keys, labels, groups and
the fraction: within each class about ``floor(n * fraction + 0.5)`` images are held out,
leaving at least 2 in train (an API-Net intra-class pair needs 2). So the general model and
every specialist of a dataset hold out the same images, whatever the shard layout, the
world size or the class subset.

By groups (the default where the dataset has them): photos of one product come in bursts
of near-copies, and a validation image whose near-copy was trained on is no test of
generalisation (on real product photos a by-image split read 27 points easier than test
and chose the wrong epoch). So whole groups of near-duplicates
(:mod:`.near_duplicates`: the perceptual hash ``rp2k pack`` stores per image) go to
validation together: within each class the groups come in the order of a hash of their
first key, and a group is held out while that brings the count closer to the target.
Datasets packed before hashes existed, or ``data.holdout_by: key``, hold out single images
ordered by a hash of their key.
"""

from __future__ import annotations

import functools
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


#: How ``data.holdout`` draws its images: whole groups of near-duplicates, or single keys.
HOLDOUT_BY = ("groups", "key")


def holdout_mask(keys: Sequence[str], labels: Sequence[int], fraction: float,
                 groups: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """bool [N]: which train samples are held out (see the module docstring); ``groups``
    [N] (ids of near-duplicate groups, :func:`~.near_duplicates.near_duplicate_groups`)
    holds out whole groups, None single images."""
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
        target = held_out_count(len(rows), fraction)
        if groups is None:
            mask[rows[:target]] = True
            continue
        members: dict[int, list[int]] = defaultdict(list)
        for i in sorted(rows, key=lambda i: str(keys[i])):
            members[int(groups[i])].append(i)
        ordered = sorted(members.values(), key=lambda m: (_rank_of(str(keys[m[0]])), str(keys[m[0]])))
        held = 0
        for group in ordered:
            if held >= target:
                break
            size = len(group)
            if len(rows) - held - size < 2 or held + size - target > target - held:
                continue  # it would leave fewer than 2 in train, or overshoot more than it undershoots
            mask[group] = True
            held += size
    return mask


def holdout_of(data: dict) -> tuple[float, str]:
    """(``data.holdout``, ``data.holdout_by``) of a run's saved config section ``data``; a run
    saved before ``holdout_by`` existed held out single keys."""
    return float(data.get("holdout", 0.0)), str(data.get("holdout_by", "key"))


def train_holdout(rows: dict[str, list], fraction: float, by: str = "groups") -> np.ndarray:
    """bool [rows in the train split]: the held-out train samples of a manifest index
    (``rows``: columns of ``index.parquet`` as lists, at least ``split``, ``key``,
    ``label`` and, for groups, ``phash``), in the index's order of train rows."""
    if by not in HOLDOUT_BY:
        raise ConfigError(f"data.holdout_by must be one of {HOLDOUT_BY}, got {by!r}")
    train = [i for i, split in enumerate(rows["split"]) if split == "train"]
    keys = [rows["key"][i] for i in train]
    labels = [rows["label"][i] for i in train]
    groups = None
    if by == "groups" and "phash" in rows:
        groups = _groups(tuple(rows["phash"][i] for i in train), tuple(labels))
    return holdout_mask(keys, labels, fraction, groups)


@functools.lru_cache(maxsize=4)
def _groups(hashes: tuple, labels: tuple) -> np.ndarray:
    """Near-duplicate groups of a train split, computed once per process: a run asks for its
    split several times at start-up (class counts, the train and the validation loaders)."""
    from .near_duplicates import near_duplicate_groups

    return near_duplicate_groups(list(hashes), list(labels))


def _class_rank(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=8, person=b"rp2k-unseen").digest()


def held_out_classes(classes: Sequence[dict], spec: int | float | Sequence[int | str]) -> list[int]:
    """``data.holdout_classes``: the classes kept out of training (global indices, sorted),
    a pure function of the manifest's class table.

    ``spec``: a count (int >= 1), a fraction of the eligible classes (float in (0, 1), at
    least one class), or a list of class names / indices; 0 = none. A count or a fraction is
    drawn among the eligible classes (at least one train image, for a gallery, and one test
    image, for queries), stratified across the ``type`` meta-categories: each type gets its
    share of the count by largest remainder (in proportion to its eligible classes), and
    within a type the classes come in the order of a hash of their name. So every run of a
    dataset holds out the same classes whatever else its config says.
    """
    if isinstance(spec, (list, tuple)):
        by_name = {c["name"]: int(c["index"]) for c in classes}
        chosen, unknown = set(), []
        for item in spec:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(classes):
                chosen.add(item)
            elif isinstance(item, str) and item in by_name:
                chosen.add(by_name[item])
            else:
                unknown.append(item)
        if unknown:
            raise ConfigError(f"data.holdout_classes: {unknown[:5]} are neither class names nor indices of the "
                              f"dataset ({len(classes)} classes)")
        return sorted(chosen)
    eligible = [c for c in classes if c["counts"].get("train", 0) >= 1 and c["counts"].get("test", 0) >= 1]
    if isinstance(spec, float):
        if not 0.0 <= spec < 1.0:
            raise ConfigError(f"data.holdout_classes as a fraction must be in [0, 1), got {spec}")
        count = max(1, math.floor(len(eligible) * spec + 0.5)) if spec > 0 else 0
    else:
        count = int(spec)
    if count < 0 or count >= len(eligible):
        raise ConfigError(f"data.holdout_classes: {count} classes cannot be held out of {len(eligible)} with both "
                          "train and test images (some must stay seen)")
    if count == 0:
        return []
    by_type: dict[str, list[dict]] = defaultdict(list)
    for c in eligible:
        by_type[str(c.get("type", "unknown"))].append(c)
    quotas = {t: count * len(members) / len(eligible) for t, members in by_type.items()}
    share = {t: math.floor(q) for t, q in quotas.items()}
    for t in sorted(quotas, key=lambda t: (-(quotas[t] - share[t]), -len(by_type[t]), t))[: count - sum(share.values())]:
        share[t] += 1
    chosen = []
    for t, members in by_type.items():
        members = sorted(members, key=lambda c: (_class_rank(str(c["name"])), str(c["name"])))
        chosen.extend(int(c["index"]) for c in members[: share[t]])
    return sorted(chosen)


def held_out_per_class(manifest, fraction: float, by: str = "groups") -> np.ndarray:
    """int64 [classes]: train images of each class of ``manifest`` (a
    :class:`~.manifest.Manifest`) that ``data.holdout`` holds out."""
    if fraction <= 0:
        return np.zeros(manifest.num_classes, np.int64)
    index = manifest.index()
    rows = index.select(["key", "split", "label"] + (["phash"] if "phash" in index.column_names else [])).to_pydict()
    labels = np.array([label for label, split in zip(rows["label"], rows["split"]) if split == "train"], np.int64)
    held = train_holdout(rows, fraction, by)
    return np.bincount(labels[held], minlength=manifest.num_classes).astype(np.int64)


def split_unseen(classes: Sequence[dict], unseen: Sequence[int]) -> tuple[list[int], list[int]]:
    """The unseen classes (``data.holdout_classes``) in two disjoint sets, (validation-unseen,
    test-unseen), global indices sorted: the open-set score and its threshold are chosen on
    the first, and reported on the second.

    Deterministic and stratified by ``type``: the types in order of name, within a type the
    classes in the order of a hash of their name, dealt alternately to test and validation
    by one counter running across the types (so each type splits evenly and the two sets
    differ in size by at most one). Test gets the first class, and so the larger half: one
    unseen class is a test set and no validation set."""
    by_type: dict[str, list[dict]] = defaultdict(list)
    for index in unseen:
        info = classes[int(index)]
        by_type[str(info.get("type", "unknown"))].append(info)
    validation, test = [], []
    turn = 0
    for t in sorted(by_type):
        for info in sorted(by_type[t], key=lambda c: (_split_rank(str(c["name"])), str(c["name"]))):
            (test if turn % 2 == 0 else validation).append(int(info["index"]))
            turn += 1
    return sorted(validation), sorted(test)


def _split_rank(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=8, person=b"rp2k-unseen-val").digest()
