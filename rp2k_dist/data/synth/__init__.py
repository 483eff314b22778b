"""A synthetic RP2K: product-like images in RP2K's exact on-disk layout.

This is the project's embedded default dataset (real RP2K cannot be downloaded here); its
modules: ``config`` (config, vocabularies, looks), ``naming``, ``catalogue``, ``quirks``,
``shapes``, ``patterns``, ``photo`` and ``writer``.
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

from .catalogue import _catalogue
from .config import (
    MARKER,
    METADATA_FILE,
    OTHERS,
    ClassSpec,
    Design,
    ImageSpec,
    SynthConfig,
    SynthSummary,
    TypeStyle,
    TypeVocab,
)
from .writer import make_synthetic_rp2k

__all__ = [
    "MARKER", "METADATA_FILE", "OTHERS", "ClassSpec", "Design", "ImageSpec", "SynthConfig",
    "SynthSummary", "TypeStyle", "TypeVocab", "_catalogue", "make_synthetic_rp2k",
]
