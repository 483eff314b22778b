"""A synthetic RP2K: product-like images in RP2K's exact on-disk layout.

This is the project's embedded default dataset (real RP2K cannot be downloaded here).
:func:`make_synthetic_rp2k` writes::

    <root>/all/train/<class folder>/<image>
    <root>/all/test/<class folder>/<image>
    <root>/metadata.csv            class,sku,name,brand,type,shape,size,flavour
    <root>/.rp2k_synth.json        marker: this tree is synthetic and may be overwritten

What makes it RP2K-like:

* Class folders are Chinese product names with sizes and full-width brackets
  (``伊利纯牛奶250ml``, ``555（冰炫）``) plus one ``others`` class, the largest.
* Class sizes are long-tailed: a few huge classes, many small ones, one of 1-2 images.
* Each class has one of the paper's 7 types (palette and label style) and 7 shapes
  (silhouette). Classes come in groups of 2-4 near-identical SKUs of one brand and product
  that differ only by an accent stripe colour or a mark position (plus the proportions
  when the variants are sizes): the fine-grained problem.
* Every photo varies background, lighting, viewpoint, blur, JPEG quality and aspect ratio.
* With ``quirks=True`` the tree also has the oddities of the released RP2K archive
  (https://www.pinlandata.com/rp2k_dataset; see :mod:`rp2k_dist.data.rp2k`), each recorded in
  :attr:`SynthSummary.quirks`: an RGBA PNG, a palette PNG, names with spaces and CJK, a
  screenshot-named file, a basename shared by two classes, an empty class folder, a class
  only in test, and one corrupt file.

Everything is a pure function of the config: the catalogue (names, class sizes, looks,
splits, quirks) draws from ``default_rng([seed, 1])`` and each image from its own
``default_rng([seed, 2, class index, image index])``, so the bytes on disk do not depend on
the number of worker processes.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ..errors import ConfigError, DataError
from .metadata import FIELDS, TYPES

T = TypeVar("T")
RGB = tuple[int, int, int]
Box = tuple[float, float, float, float]

#: Hidden file that marks a folder as an earlier synthetic output (safe to overwrite).
MARKER = ".rp2k_synth.json"
METADATA_FILE = "metadata.csv"
OTHERS = "others"

# Random streams: the first entropy word after the seed, so no two uses share numbers.
_CATALOGUE, _IMAGE = 1, 2


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SynthConfig:
    """What to synthesise. The output depends on every field except ``workers``."""

    classes: int = 48  #: non-empty classes (SKUs), ``others`` included; >= 8
    images_per_class: int = 40  #: mean images per class (sizes are long-tailed); >= 4
    image_size: int = 160  #: longer side of every image, px; >= 64
    test_fraction: float = 0.1  #: share of each class's images in test (RP2K: 90/10)
    seed: int = 0  #: >= 0
    quirks: bool = True  #: plant RP2K's real quirks (module docstring)
    workers: int = 0  #: rendering processes; 0 = os.cpu_count()
    #: "" (RP2K-like) | "accent" | "mark": the liquor classes are ONE product family of
    #: ``fine_classes`` SKUs told apart only by the accent stripe colour ("accent") or by
    #: the position of the label mark and the bottle's proportions ("mark"); a fine-grained
    #: category for benchmarking specialists (``bench/specialist_ablation.py``), each SKU
    #: with ``images_per_class`` images (the other classes keep the long tail)
    fine_grained: str = ""
    fine_classes: int = 8  #: SKUs of that family: 2..10 (accent) or 2..16 (mark)
    #: per product type, a factor on its classes' image counts and its own test share, e.g.
    #: ``{"liquor": (1.2, 0.35)}``: enough test images in a few categories to compare models
    #: there (the demo's specialist categories) without a larger set everywhere
    focus: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = (
            (_is_int(self.classes) and self.classes >= 8, "classes must be an int >= 8"),
            (
                _is_int(self.images_per_class) and self.images_per_class >= 4,
                "images_per_class must be an int >= 4",
            ),
            (
                _is_int(self.image_size) and 64 <= self.image_size <= 4096,
                "image_size must be an int in [64, 4096] (pixels, longer side)",
            ),
            (
                isinstance(self.test_fraction, (int, float)) and 0 < self.test_fraction <= 0.5,
                "test_fraction must be in (0, 0.5]",
            ),
            (_is_int(self.seed) and self.seed >= 0, "seed must be an int >= 0"),
            (isinstance(self.quirks, bool), "quirks must be a bool"),
            (_is_int(self.workers) and self.workers >= 0, "workers must be an int >= 0"),
            (self.fine_grained in FINE_CUES, f"fine_grained must be one of {FINE_CUES}"),
            (all(t in TYPES and scale > 0 and 0 < share <= 0.5 for t, (scale, share) in self.focus.items()),
             f"focus maps a type of {TYPES} to (image factor > 0, test share in (0, 0.5])"),
            (
                not self.fine_grained
                or (_is_int(self.fine_classes) and 2 <= self.fine_classes <= FINE_CUES.get(self.fine_grained, 0)
                    and self.fine_classes <= self.classes - 3),
                "fine_classes must be an int in [2, 10] (accent) or [2, 16] (mark), and <= classes - 3",
            ),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ConfigError("rp2k synth: " + "; ".join(problems))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class SynthSummary:
    """What :func:`make_synthetic_rp2k` wrote. Paths in ``quirks`` are relative to ``root``."""

    root: Path
    classes: int  #: non-empty class folders written
    train_images: int  #: files under all/train (the corrupt one included)
    test_images: int  #: files under all/test
    metadata_path: Path
    quirks: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class TypeVocab:
    """Words that class names of one product type are built from."""

    brands: tuple[str, ...]
    products: tuple[str, ...]
    sizes: tuple[str, ...]
    flavours: tuple[str, ...]


VOCAB: dict[str, TypeVocab] = {
    "dairy": TypeVocab(
        ("伊利", "蒙牛", "光明", "三元", "君乐宝", "旺仔", "新希望", "完达山"),
        ("纯牛奶", "酸奶", "优酸乳", "早餐奶", "高钙奶", "核桃奶", "风味发酵乳", "乳酸菌"),
        ("250ml", "200ml", "1L", "950ml", "180g", "100g"),
        ("原味", "草莓味", "香蕉味", "黄桃味", "低脂", "蓝莓味"),
    ),
    "liquor": TypeVocab(
        ("茅台", "五粮液", "汾酒", "洋河", "郎酒", "泸州老窖", "牛栏山", "红星", "剑南春"),
        ("白酒", "大曲", "特曲", "陈酿", "二锅头", "窖藏", "珍品"),
        ("500ml", "52度500ml", "42度475ml", "100ml", "250ML", "53度500ml"),
        ("浓香型", "清香型", "酱香型", "绵柔", "典藏"),
    ),
    "beer": TypeVocab(
        ("青岛", "雪花", "燕京", "百威", "哈尔滨", "珠江", "喜力", "嘉士伯"),
        ("啤酒", "纯生", "干啤", "黑啤", "小麦啤", "冰爽"),
        ("500ml", "330ml", "600ml", "640ml", "1L"),
        ("经典", "8度", "10度", "原浆", "勇闯天涯", "清爽"),
    ),
    "cosmetics": TypeVocab(
        ("大宝", "百雀羚", "自然堂", "相宜本草", "六神", "舒肤佳", "海飞丝", "隆力奇"),
        ("面霜", "乳液", "洗发水", "沐浴露", "护手霜", "爽肤水", "花露水", "洗面奶"),
        ("50g", "100ml", "200ml", "400ml", "750ml", "80g"),
        ("薰衣草", "茉莉", "玫瑰", "清爽型", "滋润型", "去屑"),
    ),
    "soft drinks": TypeVocab(
        ("可口可乐", "百事", "农夫山泉", "康师傅", "统一", "娃哈哈", "怡宝", "王老吉"),
        ("可乐", "雪碧", "橙汁", "绿茶", "冰红茶", "矿泉水", "苏打水", "凉茶"),
        ("330ml", "500ml", "550ml", "1.25L", "2L", "310ml"),
        ("柠檬味", "青柠味", "无糖", "蜜桃味", "原味", "低糖"),
    ),
    "seasonings": TypeVocab(
        ("海天", "李锦记", "老干妈", "东古", "太太乐", "厨邦", "恒顺", "鲁花", "千禾"),
        ("酱油", "生抽", "老抽", "黄豆酱", "蚝油", "米醋", "料酒", "鸡精", "辣椒酱"),
        ("500ml", "750G", "1.9L", "160ml", "280g", "1.28L", "200g"),
        ("特级", "金标", "减盐", "零添加", "香辣", "头道"),
    ),
    "tobacco": TypeVocab(
        ("中华", "玉溪", "红塔山", "芙蓉王", "黄鹤楼", "南京", "云烟", "555", "利群"),
        ("香烟",),
        ("",),
        ("硬", "软", "细支", "中支", "冰炫", "软经典", "金", "新版"),
    ),
}
EDITIONS: tuple[str, ...] = ("新版", "礼盒装", "促销装", "升级版", "经典版", "家庭装")

#: Shapes each type comes in (beer in cans and bottles, tobacco in packs, ...).
TYPE_SHAPES: dict[str, tuple[str, ...]] = {
    "dairy": ("box", "bottle", "bag"),
    "liquor": ("bottle", "box"),
    "beer": ("can", "bottle"),
    "cosmetics": ("jar", "bottle", "box"),
    "soft drinks": ("bottle", "can", "handled bottle"),
    "seasonings": ("bottle", "jar", "bag", "handled bottle"),
    "tobacco": ("package",),
}
#: The first groups take these, so every type and every shape occurs.
FIRST_GROUPS: tuple[tuple[str, str], ...] = (
    ("dairy", "box"),
    ("liquor", "bottle"),
    ("beer", "can"),
    ("cosmetics", "jar"),
    ("soft drinks", "handled bottle"),
    ("seasonings", "bag"),
    ("tobacco", "package"),
)
#: Share of groups per type after the first ones, roughly the image shares of Table 1.
TYPE_WEIGHTS: dict[str, float] = {
    "dairy": 0.23,
    "liquor": 0.06,
    "beer": 0.12,
    "cosmetics": 0.04,
    "soft drinks": 0.08,
    "seasonings": 0.37,
    "tobacco": 0.10,
}

# --------------------------------------------------------------------------- looks


@dataclass(frozen=True)
class TypeStyle:
    """The palette and label styles of one product type."""

    bodies: tuple[RGB, ...]
    labels: tuple[RGB, ...]
    inks: tuple[RGB, ...]
    caps: tuple[RGB, ...]
    patterns: tuple[str, ...]


STYLES: dict[str, TypeStyle] = {
    "dairy": TypeStyle(
        ((246, 246, 246), (226, 238, 250), (250, 250, 238)),
        ((28, 92, 184), (46, 150, 86), (96, 170, 230), (40, 60, 150)),
        ((18, 40, 110), (30, 30, 30)),
        ((28, 92, 184), (240, 240, 240), (46, 150, 86)),
        ("wave", "band", "emblem"),
    ),
    "liquor": TypeStyle(
        ((120, 16, 24), (245, 240, 230), (20, 40, 90), (150, 30, 30)),
        ((212, 170, 60), (150, 20, 30), (240, 220, 160)),
        ((200, 160, 50), (60, 10, 10)),
        ((212, 170, 60), (120, 16, 24)),
        ("ornate", "emblem"),
    ),
    "beer": TypeStyle(
        ((30, 110, 50), (140, 80, 20), (40, 140, 70), (20, 80, 40)),
        ((218, 180, 70), (245, 245, 235), (200, 160, 50)),
        ((20, 60, 30), (120, 20, 20)),
        ((218, 180, 70), (200, 30, 40), (230, 230, 230)),
        ("band", "emblem", "sash"),
    ),
    "cosmetics": TypeStyle(
        ((246, 205, 220), (214, 200, 240), (200, 236, 220), (250, 240, 210)),
        ((255, 255, 255), (205, 205, 215), (236, 170, 195)),
        ((120, 100, 140), (180, 120, 150)),
        ((235, 235, 240), (220, 190, 200), (190, 190, 200)),
        ("emblem", "wave", "sash"),
    ),
    "soft drinks": TypeStyle(
        ((220, 20, 40), (250, 140, 0), (0, 90, 200), (20, 170, 60), (250, 210, 0)),
        ((255, 255, 255), (250, 210, 0), (25, 25, 25)),
        ((255, 255, 255), (20, 20, 20)),
        ((220, 20, 40), (20, 170, 60), (255, 255, 255)),
        ("sash", "stripes", "wave"),
    ),
    "seasonings": TypeStyle(
        ((110, 60, 30), (190, 40, 30), (230, 180, 40), (60, 30, 20)),
        ((250, 220, 90), (200, 40, 30), (245, 235, 210)),
        ((40, 20, 10), (200, 30, 20)),
        ((200, 40, 30), (250, 200, 40), (30, 30, 30)),
        ("band", "blocks", "emblem"),
    ),
    "tobacco": TypeStyle(
        ((245, 245, 245), (200, 30, 40), (220, 190, 120), (30, 60, 140)),
        ((200, 30, 40), (245, 245, 245), (200, 160, 60)),
        ((20, 20, 20), (200, 160, 60)),
        ((245, 245, 245),),
        ("blocks", "band", "ornate"),
    ),
}
#: Accent stripe colours: the cue that tells variants of one group apart.
ACCENTS: tuple[RGB, ...] = (
    (230, 30, 40),
    (30, 80, 220),
    (20, 160, 60),
    (250, 150, 0),
    (140, 40, 170),
    (250, 220, 0),
    (15, 15, 15),
    (0, 190, 200),
    (230, 60, 170),
    (255, 255, 255),
)
#: Mark positions on the label, as (x, y) fractions of the label box.
MARK_SPOTS: tuple[tuple[float, float], ...] = (
    (0.05, 0.74),
    (0.69, 0.74),
    (0.05, 0.04),
    (0.69, 0.04),
)
#: Proportions (width / height multipliers) of size variants.
SIZE_ASPECTS: tuple[float, ...] = (0.72, 0.86, 1.0, 1.18)
#: ``SynthConfig.fine_grained`` cues and how many SKUs each can tell apart ("" = off).
FINE_CUES: dict[str, int] = {"": 0, "accent": len(ACCENTS), "mark": len(MARK_SPOTS) * len(SIZE_ASPECTS)}
FINE_TYPE, FINE_SHAPE = "liquor", "bottle"
#: The family's stripe and mark are this much larger than other products': still a small
#: part of the bottle, but a few pixels wide in the 32-48 px crops a CPU benchmark trains on.
FINE_CUE_SIZE = 1.8
#: Width / height of each shape's silhouette.
SHAPE_ASPECT: dict[str, float] = {
    "bottle": 0.34,
    "can": 0.6,
    "box": 0.72,
    "bag": 0.7,
    "jar": 0.85,
    "handled bottle": 0.62,
    "package": 0.62,
}
RIM: RGB = (192, 192, 198)


@dataclass(frozen=True)
class Design:
    """How one class's product looks; classes of a group share all but one cue."""

    shape: str
    body: RGB
    label: RGB
    ink: RGB
    cap: RGB
    pattern: str
    accent: RGB
    mark: int  #: index into MARK_SPOTS
    aspect: float  #: multiplier of the shape's width / height (size variants)
    text: tuple[tuple[float, float, float], ...]  #: fake text lines: (y, x, length) fractions
    cue_size: float = 1.0  #: size multiplier of the accent stripe and the mark (fine-grained families)


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class ImageSpec:
    """One file to write."""

    index: int  #: image index within its class: seeds the image's random stream
    split: str
    name: str
    kind: str  #: "jpg", "png", "rgba" (RGBA PNG), "palette" (P PNG) or "corrupt"


@dataclass(frozen=True)
class ClassSpec:
    """One class folder: its metadata row, its look and its files."""

    folder: str
    name: str
    brand: str
    type: str
    shape: str
    size: str
    flavour: str
    design: Design | None  #: None for ``others``: every image is a different product
    index: int = -1  #: position in the catalogue: seeds its images' random streams
    sku: str = ""
    images: tuple[ImageSpec, ...] = ()

    def row(self) -> dict[str, str]:
        return {"class": self.folder, **{key: getattr(self, key) for key in FIELDS}}


def _pick(rng: np.random.Generator, items: Sequence[T]) -> T:
    return items[int(rng.integers(len(items)))]


def _jitter(colour: RGB, rng: np.random.Generator, amount: int = 14) -> RGB:
    shifted = np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in shifted)


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


def _folder_name(kind: str, brand: str, product: str, size: str, flavour: str) -> str:
    """RP2K-style class folder name: ``伊利纯牛奶（草莓味）250ml``, ``555（冰炫）``."""
    if kind == "tobacco":
        return f"{brand}（{flavour}）"
    if flavour:
        return f"{brand}{product}（{flavour}）{size}"
    return f"{brand}{product}{size}"


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


def _relpath(spec: ClassSpec, image: ImageSpec) -> str:
    return f"all/{image.split}/{spec.folder}/{image.name}"


class _Planter:
    """Puts odd files in place of ordinary train images, taking host classes in turn."""

    def __init__(self, classes: list[ClassSpec], hosts: list[int], rng: np.random.Generator):
        self.classes, self.rng = classes, rng
        self.hosts = [int(h) for h in rng.permutation(hosts)]
        self.free = {
            h: [im.index for im in classes[h].images if im.split == "train"] for h in hosts
        }
        self.turn = 0
        self.last_host = -1

    def _next_host(self, exclude: int) -> int:
        for step in range(len(self.hosts)):
            host = self.hosts[(self.turn + step) % len(self.hosts)]
            if host != exclude and self.free[host]:
                self.turn += step + 1
                return host
        raise ConfigError("too few train images to plant the quirks; raise --images-per-class or pass --no-quirks")

    def plant(self, kind: str, name: Callable[[str], str], exclude: int = -1) -> str:
        """Turn a free train image of the next host (not class ``exclude``) into ``kind``,
        renamed ``name(old stem)``; returns its relative path."""
        host = self.last_host = self._next_host(exclude)
        free = self.free[host]
        i = free.pop(int(self.rng.integers(len(free))))
        spec = self.classes[host]
        image = spec.images[i]
        image = replace(image, kind=kind, name=name(image.name.rsplit(".", 1)[0]))
        self.classes[host] = replace(spec, images=spec.images[:i] + (image,) + spec.images[i + 1 :])
        return _relpath(self.classes[host], image)

    def copy(self) -> str:
        """Add a byte-identical copy of an untouched train JPEG, named like Windows names
        copies (``0716_7768 - 副本 (2).jpg``); returns its relative path."""
        host = self._next_host(exclude=-1)
        spec = self.classes[host]
        jpegs = [i for i in self.free[host] if spec.images[i].kind == "jpg"] or self.free[host]
        original = spec.images[_pick(self.rng, jpegs)]
        # The same index seeds the same random stream: the same pixels and bytes.
        stem, suffix = original.name.rsplit(".", 1)
        copy = replace(original, name=f"{stem} - 副本 (2).{suffix}")
        self.classes[host] = replace(spec, images=spec.images + (copy,))
        return _relpath(self.classes[host], copy)


def _plant_quirks(
    classes: list[ClassSpec], rng: np.random.Generator
) -> tuple[list[ClassSpec], dict[str, object]]:
    """Turn a clean catalogue into one with RP2K's oddities; returns what was planted."""
    empty = classes.pop()  # the extra product: a folder without images
    quirks: dict[str, object] = {"empty_class": f"all/train/{empty.folder}"}

    # The smallest class of >= 3 images moves wholly to test.
    only_test = min((c for c in classes[1:] if len(c.images) >= 3), key=lambda c: len(c.images))
    moved = tuple(replace(im, split="test") for im in only_test.images)
    classes[only_test.index] = replace(only_test, images=moved)
    quirks["test_only_class"] = f"all/test/{only_test.folder}"

    # A folder name with a space and full-width brackets, like 青岛啤酒 经典（500ml）.
    spec = classes[int(rng.choice([c.index for c in classes[1:] if c.type != "tobacco"]))]
    folder = f"{spec.brand}{spec.name} {spec.flavour or '经典'}（{spec.size}）"
    classes[spec.index] = replace(spec, folder=folder)
    quirks["space_class"] = folder

    # Odd files replace train images of classes that keep at least one other image.
    hosts = [c.index for c in classes if sum(im.split == "train" for im in c.images) >= 2]
    planter = _Planter(classes, hosts, rng)
    quirks["rgba_png"] = planter.plant("rgba", lambda stem: stem + ".png")
    quirks["palette_png"] = planter.plant("palette", lambda stem: stem + ".png")
    quirks["corrupt"] = planter.plant("corrupt", lambda stem: stem + ".jpg")
    quirks["screenshot"] = planter.plant("png", lambda stem: "截屏2019-12-10下午5.15.14.png")
    first = planter.plant("jpg", lambda stem: stem + ".jpg")
    shared = first.rsplit("/", 1)[1]
    second = planter.plant("jpg", lambda stem: shared, exclude=planter.last_host)
    quirks["duplicate_basename"] = [first, second]
    quirks["copy_name"] = planter.copy()
    return classes + [empty], quirks


# --------------------------------------------------------------------------- shapes
# Each draws a silhouette filling a w x h canvas and returns the label box (x0, y0, x1, y1).


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(int(min(255, max(0, c * factor))) for c in colour)


def _draw_bottle(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Narrow neck, sloping shoulders, cap."""
    draw.rectangle((0.37 * w, 0.0, 0.63 * w, 0.07 * h), fill=d.cap)
    draw.rectangle((0.39 * w, 0.07 * h, 0.61 * w, 0.23 * h), fill=d.body)
    shoulder = [(0.39 * w, 0.22 * h), (0.61 * w, 0.22 * h), (w - 1, 0.38 * h), (0, 0.38 * h)]
    draw.polygon(shoulder, fill=d.body)
    draw.rounded_rectangle((0, 0.36 * h, w - 1, h - 1), radius=0.12 * w, fill=d.body)
    return (0, 0.5 * h, w - 1, 0.86 * h)


def _draw_can(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Short cylinder with metal rims top and bottom."""
    draw.ellipse((0, 0.86 * h, w - 1, h - 1), fill=_shade(RIM, 0.8))
    draw.rectangle((0, 0.06 * h, w - 1, 0.93 * h), fill=d.body)
    draw.rectangle((0, 0.06 * h, w - 1, 0.1 * h), fill=RIM)
    draw.ellipse((0, 0, w - 1, 0.12 * h), fill=RIM)
    draw.ellipse((0.12 * w, 0.015 * h, 0.88 * w, 0.1 * h), fill=_shade(RIM, 0.85))
    return (0, 0.16 * h, w - 1, 0.86 * h)


def _draw_box(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Rectangular carton with a lit top face and a shaded side face."""
    k = 0.14 * w
    front = w - 1 - k
    draw.rectangle((0, k, front, h - 1), fill=d.body)
    draw.polygon([(0, k), (k, 0), (w - 1, 0), (front, k)], fill=_shade(d.body, 1.18))
    side = [(front, k), (w - 1, 0), (w - 1, h - 1 - k), (front, h - 1)]
    draw.polygon(side, fill=_shade(d.body, 0.7))
    return (0.06 * w, 0.26 * h, front - 0.06 * w, 0.84 * h)


def _draw_bag(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Pillow pouch: bulging sides, crimped seals top and bottom."""
    ts = np.linspace(0.0, 1.0, 12)
    left = [(0.08 * w * (1 - math.sin(math.pi * t)), (0.06 + 0.88 * t) * h) for t in ts]
    right = [(w - 1 - x, y) for x, y in reversed(left)]
    draw.polygon(left + right, fill=d.body)
    seal = _shade(d.body, 0.85)
    for y0 in (0.0, 0.93 * h):
        draw.rectangle((0.08 * w, y0, 0.92 * w, y0 + 0.07 * h), fill=seal)
        teeth = 10
        for i in range(teeth):
            x = 0.08 * w + (i + 0.5) * 0.84 * w / teeth
            draw.line((x, y0, x, y0 + 0.07 * h), fill=_shade(d.body, 0.6), width=max(1, w // 60))
    return (0.12 * w, 0.24 * h, 0.88 * w, 0.8 * h)


def _draw_jar(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Wide body with a ridged lid."""
    draw.rounded_rectangle((0, 0.14 * h, w - 1, h - 1), radius=0.16 * w, fill=d.body)
    draw.rounded_rectangle((0.07 * w, 0, 0.93 * w, 0.18 * h), radius=0.03 * w, fill=d.cap)
    for i in range(1, 6):
        x = 0.07 * w + i * 0.86 * w / 6
        draw.line((x, 0.02 * h, x, 0.16 * h), fill=_shade(d.cap, 0.75), width=max(1, w // 80))
    return (0, 0.34 * h, w - 1, 0.82 * h)


def _draw_handled_bottle(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Jug: off-centre neck and a handle loop on the right shoulder."""
    ring = max(2, int(0.09 * w))
    draw.ellipse((0.5 * w, 0.16 * h, w - 1, 0.6 * h), outline=_shade(d.body, 0.9), width=ring)
    draw.rectangle((0.18 * w, 0.0, 0.42 * w, 0.07 * h), fill=d.cap)
    draw.rectangle((0.2 * w, 0.07 * h, 0.4 * w, 0.2 * h), fill=d.body)
    shoulder = [(0.2 * w, 0.19 * h), (0.4 * w, 0.19 * h), (0.8 * w, 0.32 * h), (0, 0.32 * h)]
    draw.polygon(shoulder, fill=d.body)
    draw.rounded_rectangle((0, 0.3 * h, 0.8 * w, h - 1), radius=0.08 * w, fill=d.body)
    return (0.03 * w, 0.48 * h, 0.77 * w, 0.86 * h)


def _draw_package(draw: ImageDraw.ImageDraw, w: int, h: int, d: Design) -> Box:
    """Flat pack (cigarettes): flip-top lid line and a thin side face."""
    side = 0.08 * w
    draw.rectangle((0, 0, w - 1 - side, h - 1), fill=d.body)
    draw.rectangle((w - 1 - side, 0, w - 1, h - 1), fill=_shade(d.body, 0.72))
    draw.line((0, 0.27 * h, w - 1, 0.27 * h), fill=_shade(d.body, 0.6), width=max(1, h // 90))
    return (0.05 * w, 0.33 * h, w - 1 - side - 0.05 * w, 0.93 * h)


SHAPE_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, int, int, Design], Box]] = {
    "bottle": _draw_bottle,
    "can": _draw_can,
    "box": _draw_box,
    "bag": _draw_bag,
    "jar": _draw_jar,
    "handled bottle": _draw_handled_bottle,
    "package": _draw_package,
}
ROUND_SHAPES = frozenset({"bottle", "can", "jar", "handled bottle"})

# --------------------------------------------------------------------------- label patterns
# Each paints the label box in a type's style; marks and print go on top afterwards.


def _pattern_band(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Solid label with ink rules top and bottom (dairy, beer, seasonings)."""
    x0, y0, x1, y1 = box
    rule = 0.06 * (y1 - y0)
    draw.rectangle(box, fill=d.label)
    draw.rectangle((x0, y0, x1, y0 + rule), fill=d.ink)
    draw.rectangle((x0, y1 - rule, x1, y1), fill=d.ink)


def _pattern_stripes(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Horizontal stripes, label colour on body colour (soft drinks)."""
    x0, y0, x1, y1 = box
    step = (y1 - y0) / 7
    for i in range(0, 7, 2):
        draw.rectangle((x0, y0 + i * step, x1, y0 + (i + 1) * step), fill=d.label)


def _pattern_sash(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """A diagonal sash across the label (soft drinks, beer, cosmetics)."""
    x0, y0, x1, y1 = box
    lh = y1 - y0
    sash = [(x0, y0 + 0.55 * lh), (x1, y0 + 0.05 * lh), (x1, y0 + 0.4 * lh), (x0, y0 + 0.9 * lh)]
    draw.polygon(sash, fill=d.label)


def _pattern_emblem(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """A round emblem with an ink ring in the label centre."""
    x0, y0, x1, y1 = box
    draw.rectangle(box, fill=_shade(d.body, 1.08))
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, 0.36 * min(x1 - x0, y1 - y0)
    ring = max(1, int(r / 6))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=d.label, outline=d.ink, width=ring)


def _pattern_ornate(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Double frame and a diamond: the ornate style of liquor and premium tobacco."""
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    draw.rectangle(box, fill=d.label)
    for inset, width in ((0.05, 0.03), (0.12, 0.015)):
        m = inset * min(lw, lh)
        frame = (x0 + m, y0 + m, x1 - m, y1 - m)
        draw.rectangle(frame, outline=d.ink, width=max(1, int(width * lw)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = 0.25 * lw, 0.25 * lh
    draw.polygon([(cx, cy - ry), (cx + rx, cy), (cx, cy + ry), (cx - rx, cy)], fill=d.ink)


def _pattern_blocks(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Big colour block over plain ground (tobacco packs, seasoning labels)."""
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1, y0 + 0.48 * (y1 - y0)), fill=d.label)
    draw.rectangle((x0, y0 + 0.48 * (y1 - y0), x1, y0 + 0.52 * (y1 - y0)), fill=d.ink)


def _pattern_wave(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Lower label part under a wavy edge (dairy, cosmetics)."""
    x0, y0, x1, y1 = box
    ts = np.linspace(0.0, 1.0, 16)
    crest = [(x0 + t * (x1 - x0), y0 + (0.45 + 0.1 * math.sin(6 * t)) * (y1 - y0)) for t in ts]
    draw.polygon(crest + [(x1, y1), (x0, y1)], fill=d.label)


PATTERNS: dict[str, Callable[[ImageDraw.ImageDraw, Box, Design], None]] = {
    "band": _pattern_band,
    "stripes": _pattern_stripes,
    "sash": _pattern_sash,
    "emblem": _pattern_emblem,
    "ornate": _pattern_ornate,
    "blocks": _pattern_blocks,
    "wave": _pattern_wave,
}


def _draw_marks(draw: ImageDraw.ImageDraw, box: Box, d: Design) -> None:
    """Fake print lines, the accent stripe and the variant mark."""
    x0, y0, x1, y1 = box
    lw, lh = x1 - x0, y1 - y0
    for y, x, length in d.text:
        line = (x0 + x * lw, y0 + y * lh, x0 + (x + length) * lw, y0 + (y + 0.06) * lh)
        draw.rectangle(line, fill=d.ink)
    draw.rectangle((x0, y0 + 0.56 * lh, x1, y0 + (0.56 + 0.14 * d.cue_size) * lh), fill=d.accent)
    mx, my = MARK_SPOTS[d.mark]
    mw, mh = min(0.26 * d.cue_size, 1 - mx), min(0.2 * d.cue_size, 1 - my)  # inside the label
    draw.rectangle(
        (x0 + mx * lw, y0 + my * lh, x0 + (mx + mw) * lw, y0 + (my + mh) * lh),
        fill=d.ink,
        outline=d.accent,
        width=max(1, int(0.03 * lw)),
    )


def _cylinder_light(width: int) -> np.ndarray:
    """Per-column brightness of a lit cylinder: dark edges, a highlight left of centre."""
    x = (np.arange(width) + 0.5) / width
    return 0.72 + 0.32 * np.sin(np.pi * x) ** 0.6 + 0.22 * np.exp(-(((x - 0.3) / 0.07) ** 2))


def _product(d: Design, height: int) -> Image.Image:
    """The product alone on a transparent canvas, ``height`` px tall (RGBA)."""
    width = max(8, round(height * SHAPE_ASPECT[d.shape] * d.aspect))
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    box = SHAPE_DRAWERS[d.shape](draw, width, height, d)
    PATTERNS[d.pattern](draw, box, d)
    _draw_marks(draw, box, d)
    if d.shape in ROUND_SHAPES or d.shape == "bag":
        pixels = np.asarray(image, dtype=np.float32)
        light = _cylinder_light(width)[None, :]
        if d.shape == "bag":  # a pillow: brightest in the middle both ways, and flatter
            rows = np.sin(np.linspace(0, np.pi, height))[:, None]
            light = 0.85 + 0.15 * (light - 0.72) / 0.54 * rows
        pixels[..., :3] *= light[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")
    return image


# --------------------------------------------------------------------------- photos


def _background(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A shop-like backdrop: plain, gradient, shelf edge with neighbours, or blotchy noise."""
    kind = int(rng.integers(4))
    base = _jitter((int(rng.integers(120, 250)),) * 3, rng, 30)
    if kind == 0:
        return Image.new("RGB", (width, height), base)
    if kind == 1:
        top, bottom = np.array(base, np.float32), np.array(_jitter(base, rng, 70), np.float32)
        t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
        column = top * (1 - t) + bottom * t
        return Image.fromarray(np.broadcast_to(column, (height, width, 3)).astype(np.uint8))
    if kind == 2:
        image = Image.new("RGB", (width, height), base)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(1, 3))):  # shelf edges / price strips
            y = rng.uniform(0, height)
            edge = _pick(rng, ((235, 235, 235), (90, 90, 95), (240, 170, 40), (200, 40, 40)))
            draw.rectangle((0, y, width, y + rng.uniform(0.04, 0.1) * height), fill=edge)
        for x in (0, width):  # neighbouring products cut by the crop
            reach = rng.uniform(0.04, 0.16) * width
            colour = tuple(int(c) for c in rng.integers(20, 240, 3))
            neighbour = (x - reach, rng.uniform(0.05, 0.4) * height, x + reach, height)
            draw.rounded_rectangle(neighbour, radius=reach / 3, fill=colour)
        return image
    # Blotches: a coarse grid of muted colours around the base, blown up, plus grain.
    grid = (int(rng.integers(2, 6)), int(rng.integers(2, 6)), 1)
    coarse = np.array(base) + rng.normal(0, 28, grid) + rng.normal(0, 12, grid[:2] + (3,))
    coarse = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8))
    blotches = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    grain = rng.normal(0.0, 6.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(blotches + grain, 0, 255).astype(np.uint8))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    return tuple(np.linalg.solve(np.array(rows, float), np.array(rhs, float)).tolist())


def _viewpoint(product: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Slight perspective tilt and rotation in one warp (premultiplied alpha: no dark
    fringes); the canvas grows to hold the warped product."""
    w, h = product.size
    corners = np.array([(0, 0), (w, 0), (w, h), (0, h)], float)
    tilted = corners + rng.uniform(-1, 1, (4, 2)) * np.array([0.07 * w, 0.05 * h])
    angle = math.radians(rng.uniform(-7, 7))
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    dst = (tilted - (w / 2, h / 2)) @ turn.T
    dst -= dst.min(axis=0)
    size = tuple(int(v) + 1 for v in dst.max(axis=0))
    coeffs = _perspective_coeffs(dst, corners)
    warped = product.convert("RGBa").transform(
        size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR
    )
    return warped.convert("RGBA")


def _lighting(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, white balance and sensor noise on an HxWx3 float array."""
    contrast, brightness = rng.uniform(0.75, 1.2), rng.uniform(0.72, 1.25)
    gains = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    pixels = (pixels - 128.0) * contrast + 128.0
    pixels *= brightness * gains
    pixels += rng.normal(0.0, rng.uniform(0.0, 6.0), pixels.shape[:2] + (1,)).astype(np.float32)
    return np.clip(pixels, 0, 255)


def _photo(
    design: Design, image_size: int, rng: np.random.Generator, transparent: bool = False
) -> Image.Image:
    """One shop photo of the product: RGB, or RGBA with a transparent backdrop.

    The longer side is ``image_size``; most photos are portrait, as product crops are.
    """
    aspect = rng.uniform(0.5, 0.95) if rng.random() < 0.8 else rng.uniform(0.95, 1.35)
    if aspect > 1:
        width, height = image_size, round(image_size / aspect)
    else:
        width, height = round(image_size * aspect), image_size
    # Drawn at twice the size and halved after the warp: anti-aliased edges.
    tall = rng.uniform(0.6, 0.88) * height
    wide = tall * SHAPE_ASPECT[design.shape] * design.aspect
    tall = min(tall, tall * 0.88 * width / wide)
    product = _viewpoint(_product(design, max(16, round(2 * tall))), rng).reduce(2)
    pw, ph = product.size
    x = int((width - pw) / 2 + rng.uniform(-0.5, 0.5) * max(0, width - pw))
    y = int((height - ph) / 2 + rng.uniform(-0.5, 0.5) * max(0, height - ph))
    if transparent:
        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        canvas.alpha_composite(product, (max(x, 0), max(y, 0)))
    else:
        canvas = _background(width, height, rng)
        canvas.paste(product, (x, y), product)
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels[..., :3] = _lighting(pixels[..., :3], rng)
    image = Image.fromarray(pixels.astype(np.uint8), canvas.mode)
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4) * image_size / 160))
    return image


def _encode(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """File bytes of one image of ``kind`` (see :class:`ImageSpec`)."""
    out = BytesIO()
    if kind == "jpg" or kind == "corrupt":
        image.save(out, "JPEG", quality=int(rng.integers(55, 96)))
    elif kind == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=128).save(out, "PNG")
    else:  # "png" (RGB) or "rgba"
        image.save(out, "PNG")
    data = out.getvalue()
    if kind == "corrupt":  # a download cut inside the headers, then junk: undecodable
        data = data[: data.index(b"\xff\xda") // 2] + rng.bytes(256)
    return data


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class _Chunk:
    """Up to ``_CHUNK`` images of one class: the unit of work of a rendering process."""

    root: Path
    seed: int
    image_size: int
    spec: ClassSpec
    images: tuple[ImageSpec, ...]


_CHUNK = 32


def _render_chunk(chunk: _Chunk) -> int:
    """Render and write a chunk's images; returns how many."""
    spec = chunk.spec
    for image in chunk.images:
        rng = np.random.default_rng([chunk.seed, _IMAGE, spec.index, image.index])
        design = spec.design or _random_design(rng)
        photo = _photo(design, chunk.image_size, rng, transparent=image.kind == "rgba")
        path = chunk.root / "all" / image.split / spec.folder / image.name
        path.write_bytes(_encode(photo, image.kind, rng))
    return len(chunk.images)


def _chunks(root: Path, config: SynthConfig, classes: list[ClassSpec]) -> list[_Chunk]:
    """Work units, biggest classes first so processes finish together."""
    out = []
    for spec in sorted(classes, key=lambda c: -len(c.images)):
        for start in range(0, len(spec.images), _CHUNK):
            images = spec.images[start : start + _CHUNK]
            out.append(_Chunk(root, config.seed, config.image_size, spec, images))
    return out


def _write_metadata(path: Path, classes: list[ClassSpec]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=("class", *FIELDS))
        writer.writeheader()
        for spec in sorted(classes, key=lambda c: c.folder):
            writer.writerow(spec.row())


def _check_root(root: Path) -> None:
    """Refuse a root that is a file, or a non-empty folder we did not write."""
    if root.is_symlink() or (root.exists() and not root.is_dir()):
        raise DataError(f"{root} exists and is not a folder; pick another dataset root")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise DataError(
            f"{root} is not empty and is not an earlier synthetic dataset (no {MARKER}); "
            "refusing to overwrite it: pick an empty or new folder"
        )


def make_synthetic_rp2k(
    root: str | Path, config: SynthConfig = SynthConfig(), progress: bool = False
) -> SynthSummary:
    """Write a synthetic RP2K under ``root`` (layout in the module docstring).

    ``root`` must be missing, empty, or an earlier output of this function (which is
    replaced). The tree is built in a temporary folder next to ``root`` and renamed into
    place at the end, so an interrupted run never leaves a half dataset behind.
    Same config, same bytes, whatever ``config.workers``. ``progress`` shows a tqdm bar
    (on a terminal only).
    """
    root = Path(root).absolute()
    _check_root(root)
    classes, quirks = _catalogue(config)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".partial", dir=root.parent))
    try:
        for spec in classes:
            splits = {im.split for im in spec.images} or {"train"}
            for split in splits:
                (staging / "all" / split / spec.folder).mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            (staging / "all" / split).mkdir(parents=True, exist_ok=True)
        _render_all(_chunks(staging, config, classes), config.workers, progress)
        _write_metadata(staging / METADATA_FILE, classes)
        settings = {k: v for k, v in asdict(config).items() if k != "workers"}
        marker = {"generator": __name__, "config": settings, "quirks": quirks}
        text = json.dumps(marker, ensure_ascii=False, indent=2, sort_keys=True) + "\n"
        (staging / MARKER).write_text(text, encoding="utf-8")
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    images = [im for spec in classes for im in spec.images]
    return SynthSummary(
        root=root,
        classes=sum(bool(spec.images) for spec in classes),
        train_images=sum(im.split == "train" for im in images),
        test_images=sum(im.split == "test" for im in images),
        metadata_path=root / METADATA_FILE,
        quirks=quirks,
    )


def _render_all(chunks: list[_Chunk], workers: int, progress: bool) -> None:
    """Render every chunk, in ``workers`` processes (0 = one per CPU)."""
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    total = sum(len(chunk.images) for chunk in chunks)
    disable = None if progress else True  # None: only on a terminal
    with tqdm(total=total, desc="synthesising RP2K", unit="img", disable=disable) as bar:
        if workers <= 1:
            for chunk in chunks:
                bar.update(_render_chunk(chunk))
            return
        with _pool_context().Pool(workers) as pool:
            for done in pool.imap_unordered(_render_chunk, chunks):
                bar.update(done)


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where the OS has it: unlike spawn it works from scripts without a
    ``__main__`` guard, and the children only run numpy and PIL code."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def _swap_into_place(staging: Path, root: Path) -> None:
    """Rename the finished tree to ``root``, replacing an empty or earlier synthetic one."""
    if not root.exists():
        staging.rename(root)
        return
    old = root.with_name(f"{staging.name}.old")
    root.rename(old)
    staging.rename(root)
    shutil.rmtree(old)
