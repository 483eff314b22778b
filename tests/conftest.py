"""Shared fixtures: small RP2K-like trees made on the spot, and packed shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import jpeg_bytes, write_image


@pytest.fixture(scope="session")
def quirky_tree(tmp_path_factory) -> Path:
    """An RP2K tree with every documented quirk, written file by file."""
    root = tmp_path_factory.mktemp("rp2k") / "rp2k"
    base = root / "all"
    write_image(base / "train" / "伊利纯牛奶250ml" / "0716_7768.jpg", 1)
    write_image(base / "train" / "伊利纯牛奶250ml" / "1103_74556 - 副本 (2).jpg", 2)
    write_image(base / "test" / "伊利纯牛奶250ml" / "0514_10877_0.99999917.jpg", 3)
    # duplicate basename in another class
    write_image(base / "train" / "555（冰炫）" / "0716_7768.jpg", 4)
    write_image(base / "train" / "555（冰炫）" / "截屏2019-12-10下午5.15.14.png", 5, mode="RGBA")
    write_image(base / "test" / "555（冰炫）" / "p.png", 6, mode="P")
    # a class with a space and full-width brackets, train only
    write_image(base / "train" / "青岛啤酒 经典（500ml）" / "a.jpg", 7)
    # a test-only class
    write_image(base / "test" / "东古黄豆酱750G" / "b.jpg", 8)
    # empty class folder, a zero-byte file, a non-image file, a corrupt jpg
    (base / "train" / "空的").mkdir(parents=True)
    (base / "train" / "伊利纯牛奶250ml" / "empty.jpg").write_bytes(b"")
    (base / "train" / "伊利纯牛奶250ml" / "Thumbs.db").write_bytes(b"x")
    (base / "train" / "555（冰炫）" / "broken.jpg").write_bytes(jpeg_bytes(9)[:100])
    (root / "metadata.csv").write_text(
        "\ufeffclass,sku,name,brand,type,shape,size,flavour\n"
        "伊利纯牛奶250ml,000123,Yili milk,Yili,dairy,box,250ml,\n"
        "555（冰炫）,000456,555 Ice,555,tobacco,package,,ice\n"
        "青岛啤酒 经典（500ml）,000789,Tsingtao,Tsingtao,Beer,Can,500ml,\n"
        "不存在,000999,ghost,,dairy,bag,,\n",
        encoding="utf-8",
    )
    return root
