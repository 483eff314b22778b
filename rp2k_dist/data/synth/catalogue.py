"""Catalogue planning: class sizes, groups of near-identical SKUs, fine families, splits,
and the file list of every class (all drawn from ``default_rng([seed, 1])``)."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np

from ..metadata import TYPES
from .config import (
    ACCENTS, ClassSpec, Design, EDITIONS, FINE_CUE_SIZE, FINE_SHAPE, FINE_TYPE, FIRST_GROUPS,
    ImageSpec, MARK_SPOTS, OTHERS, SIZE_ASPECTS, STYLES, SynthConfig, TYPE_SHAPES,
    TYPE_WEIGHTS, VOCAB, _CATALOGUE, _jitter, _pick,
)
from .naming import _file_names, _folder_name
from .quirks import _plant_quirks


def _fake_text(rng: np.random.Generator) -> tuple[tuple[float, float, float], ...]:
    """Two or three lines of 'print' in the upper half of a label."""
    lines = int(rng.integers(2, 4))
    return tuple(
        (0.14 + 0.13 * i, float(rng.uniform(0.08, 0.3)), float(rng.uniform(0.3, 0.62)))
        for i in range(lines)
    )


def _base_design(kind: str, shape: str, rng: np.random.Generator) -> Design:
    """A random look in the style of product type ``kind``."""
    style = STYLES[kind]
    return Design(
        shape=shape,
        body=_jitter(_pick(rng, style.bodies), rng),
        label=_jitter(_pick(rng, style.labels), rng),
        ink=_pick(rng, style.inks),
        cap=_pick(rng, style.caps),
        pattern=_pick(rng, style.patterns),
        accent=_pick(rng, ACCENTS),
        mark=int(rng.integers(len(MARK_SPOTS))),
        aspect=1.0,
        text=_fake_text(rng),
    )


def _random_design(rng: np.random.Generator) -> Design:
    """Any product at all: what the ``others`` class shows."""
    kind = _pick(rng, TYPES)
    return _base_design(kind, _pick(rng, TYPE_SHAPES[kind]), rng)


def _group_sizes(count: int, rng: np.random.Generator) -> list[int]:
    """Split ``count`` (>= 2) classes into groups of 2-4."""
    sizes, left = [], count
    while left:
        size = min(int(rng.integers(2, 5)), left)
        if left - size == 1:  # never leave a group of one
            size = left if left <= 4 else size - 1
        sizes.append(size)
        left -= size
    return sizes


def _make_group(
    kind: str, shape: str, count: int, taken: set[str], rng: np.random.Generator
) -> list[ClassSpec]:
    """``count`` near-identical SKUs of one brand and product, with unique folder names.

    The variants differ by size or flavour in name, and in look by the accent stripe
    colour or the mark position; size variants also differ in proportions.
    """
    vocab = VOCAB[kind]
    by_size = kind != "tobacco" and count <= len(vocab.sizes) and rng.random() < 0.5
    cue = "accent" if rng.random() < 0.5 else "mark"
    base = _base_design(kind, shape, rng)
    accents = rng.permutation(len(ACCENTS))[:count]
    marks = rng.permutation(len(MARK_SPOTS))[:count]
    aspects = rng.permutation(len(SIZE_ASPECTS))[:count]
    for attempt in itertools.count():
        brand, product = _pick(rng, vocab.brands), _pick(rng, vocab.products)
        if by_size:
            flavour = _pick(rng, vocab.flavours) if rng.random() < 0.3 else ""
            tags = [(vocab.sizes[i], flavour) for i in rng.permutation(len(vocab.sizes))[:count]]
        else:
            size = _pick(rng, vocab.sizes)
            tags = [(size, vocab.flavours[i]) for i in rng.permutation(len(vocab.flavours))[:count]]
        # Once brand x product pairs run out (thousands of classes): new editions.
        edition = f"（{EDITIONS[attempt % len(EDITIONS)]}{attempt}）" if attempt >= 20 else ""
        names = [_folder_name(kind, brand, product, s, f) + edition for s, f in tags]
        if not taken.intersection(names):
            break
    taken.update(names)
    group = []
    for k, ((size, flavour), folder) in enumerate(zip(tags, names)):
        design = replace(base, text=_fake_text(rng))
        if cue == "accent":
            design = replace(design, accent=ACCENTS[accents[k]])
        else:
            design = replace(design, mark=int(marks[k]))
        if by_size:
            design = replace(design, aspect=SIZE_ASPECTS[aspects[k]])
        group.append(ClassSpec(folder, product, brand, kind, shape, size, flavour, design))
    return group


def _products(count: int, rng: np.random.Generator, fine_grained: str = "", fine_classes: int = 0) -> list[ClassSpec]:
    """``count`` products in groups; the first groups cover every type and shape. With
    ``fine_grained``, the first ``fine_classes`` are the fine-grained family
    (:func:`_fine_family`) and no other group is of its type."""
    taken: set[str] = {OTHERS}
    out: list[ClassSpec] = []
    types, first = TYPES, FIRST_GROUPS
    if fine_grained:
        out = _fine_family(fine_grained, fine_classes, taken, rng)
        count -= fine_classes
        types = tuple(t for t in TYPES if t != FINE_TYPE)
        first = tuple(g for g in FIRST_GROUPS if g[0] != FINE_TYPE)
    weights = np.array([TYPE_WEIGHTS[t] for t in types])
    for g, size in enumerate(_group_sizes(count, rng)):
        if g < len(first):
            kind, shape = first[g]
        else:
            kind = types[int(rng.choice(len(types), p=weights / weights.sum()))]
            shape = _pick(rng, TYPE_SHAPES[kind])
        out.extend(_make_group(kind, shape, size, taken, rng))
    return out


def _fine_family(cue: str, count: int, taken: set[str], rng: np.random.Generator) -> list[ClassSpec]:
    """``count`` SKUs of one liquor bottle that share everything (brand, palette, pattern,
    print) but one cue: the accent stripe colour, or the mark position with the bottle's
    proportions. Stripe and mark are drawn :data:`FINE_CUE_SIZE` times larger."""
    vocab = VOCAB[FINE_TYPE]
    base = replace(_base_design(FINE_TYPE, FINE_SHAPE, rng), cue_size=FINE_CUE_SIZE)
    brand, product, size = _pick(rng, vocab.brands), _pick(rng, vocab.products), _pick(rng, vocab.sizes)
    if cue == "accent":
        designs = [replace(base, accent=ACCENTS[i]) for i in rng.permutation(len(ACCENTS))[:count]]
    else:
        looks = [(m, a) for m in range(len(MARK_SPOTS)) for a in range(len(SIZE_ASPECTS))]
        designs = [replace(base, mark=looks[i][0], aspect=SIZE_ASPECTS[looks[i][1]])
                   for i in rng.permutation(len(looks))[:count]]
    family = []
    for k, design in enumerate(designs):
        flavour = f"{vocab.flavours[k % len(vocab.flavours)]}{k + 1}号"
        folder = _folder_name(FINE_TYPE, brand, product, size, flavour)
        taken.add(folder)
        family.append(ClassSpec(folder, product, brand, FINE_TYPE, FINE_SHAPE, size, flavour, design))
    return family


def _class_sizes(config: SynthConfig, rng: np.random.Generator) -> list[int]:
    """Long-tailed image counts; index 0 is ``others`` (5-8x the mean when classes >= 40).

    Two tiny classes (1 and 2 images; 2 and 2 without quirks), the rest log-normal, scaled
    so the total is about ``classes * images_per_class``.
    """
    n, mean = config.classes, config.images_per_class
    others = round(mean * min(6.5, max(2.0, n / 8)))
    tiny = [1, 2] if config.quirks else [2, 2]
    rest_n = n - 1 - len(tiny)
    weights = rng.lognormal(0.0, 1.0, rest_n)
    budget = max(n * mean - others - sum(tiny), 3 * rest_n)
    rest = np.clip(np.round(weights / weights.sum() * budget), 3, others - 1).astype(int)
    body = tiny + rest.tolist()
    return [others] + [body[i] for i in rng.permutation(len(body))]


def _test_count(n: int, fraction: float) -> int:
    """Test images of a class of ``n``: ``round(n * fraction)``, >= 1 if n >= 2, < n."""
    return min(max(math.floor(n * fraction + 0.5), 1 if n >= 2 else 0), n - 1)


def _catalogue(config: SynthConfig) -> tuple[list[ClassSpec], dict[str, object]]:
    """Every class folder with its files, and the quirks planted (relative paths)."""
    rng = np.random.default_rng([config.seed, _CATALOGUE])
    sizes = _class_sizes(config, rng)
    # With quirks one more product is made: it becomes the empty class folder.
    products = _products(config.classes - 1 + int(config.quirks), rng, config.fine_grained, config.fine_classes)
    if config.fine_grained:  # the family (products 1..fine_classes) is balanced: a clean benchmark
        sizes[1 : 1 + config.fine_classes] = [config.images_per_class] * config.fine_classes
    # The paper files every image under some type and shape (Table 1 sums to the whole
    # set), so ``others`` gets the largest ones although it shows all kinds of products.
    others = ClassSpec(OTHERS, OTHERS, "", "seasonings", "bottle", "", "", design=None)
    products = [others] + products
    skus = rng.choice(10**6, size=len(products), replace=False)
    shares = [config.test_fraction] * len(products)
    for index, product in enumerate(products[1:len(sizes)], 1):  # others and the empty class keep theirs
        if product.type in config.focus:
            scale, shares[index] = config.focus[product.type]
            sizes[index] = max(2, round(sizes[index] * scale))
    stems = iter(_file_names(sum(sizes), rng))

    classes = []
    for index, (product, n) in enumerate(zip(products, sizes + [0])):
        n_train = n - _test_count(n, shares[index])
        images = []
        for i in range(n):
            png = rng.random() < 0.06
            split = "train" if i < n_train else "test"
            name = next(stems) + (".png" if png else ".jpg")
            images.append(ImageSpec(i, split, name, "png" if png else "jpg"))
        sku = f"{skus[index]:07d}"
        classes.append(replace(product, index=index, sku=sku, images=tuple(images)))
    if not config.quirks:
        return classes, {}
    return _plant_quirks(classes, rng)
