"""The synthetic set's config and summary, its type vocabularies and looks, and the
records the catalogue is made of (:class:`Design`, :class:`ImageSpec`, :class:`ClassSpec`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from ...errors import ConfigError
from ..metadata import FIELDS, TYPES


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
