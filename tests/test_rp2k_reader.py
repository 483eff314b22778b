"""The RP2K reader copes with the quirks of the released archive (rp2k_dist/data/rp2k.py lists them)."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from rp2k_dist.data.images import CorruptImageError, load_rgb
from rp2k_dist.data.metadata import MetadataColumns, MetadataError, load_metadata
from rp2k_dist.data.rp2k import DatasetLayoutError, scan_rp2k
from tests.helpers import write_image


def test_class_index_is_sorted_union_without_empty_folders(quirky_tree):
    index = scan_rp2k(quirky_tree)
    names = [c.name for c in index.classes]
    assert names == sorted(["伊利纯牛奶250ml", "555（冰炫）", "青岛啤酒 经典（500ml）", "东古黄豆酱750G"])
    assert [c.index for c in index.classes] == list(range(4))
    assert index.layout == "rp2k"
    assert index.report.empty_classes == ["空的"]
    assert index.report.only_in_train == ["青岛啤酒 经典（500ml）"]
    assert index.report.only_in_test == ["东古黄豆酱750G"]


def test_records_keyed_by_relative_path_and_odd_files_reported(quirky_tree):
    index = scan_rp2k(quirky_tree)
    train = {r.relpath for r in index.records["train"]}
    # the duplicate basename stays two distinct samples
    assert "all/train/伊利纯牛奶250ml/0716_7768.jpg" in train
    assert "all/train/555（冰炫）/0716_7768.jpg" in train
    assert "all/train/伊利纯牛奶250ml/1103_74556 - 副本 (2).jpg" in train
    assert index.report.empty_files == ["all/train/伊利纯牛奶250ml/empty.jpg"]
    assert index.report.non_image_files == ["all/train/伊利纯牛奶250ml/Thumbs.db"]
    # the corrupt file is listed (decode errors surface when pixels are read)
    assert "all/train/555（冰炫）/broken.jpg" in train
    milk = next(c for c in index.classes if c.name == "伊利纯牛奶250ml")
    assert milk.counts == {"train": 2, "test": 1}
    labels = {r.relpath: r.label for r in index.records["train"]}
    assert labels["all/train/伊利纯牛奶250ml/0716_7768.jpg"] == milk.index


def test_rgba_and_palette_png_composited_on_white(quirky_tree):
    rgba = load_rgb(quirky_tree / "all/train/555（冰炫）/截屏2019-12-10下午5.15.14.png")
    assert rgba.mode == "RGB"
    assert rgba.getpixel((3, 3)) == (255, 255, 255)  # transparent top half -> white
    palette = load_rgb(quirky_tree / "all/test/555（冰炫）/p.png")
    assert palette.mode == "RGB" and palette.size == (48, 64)


def test_palette_png_with_transparency_goes_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    image.save(tmp_path / "t.png", transparency=0)
    assert load_rgb(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_corrupt_and_truncated_files_raise_named_error(quirky_tree, tmp_path):
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        load_rgb(quirky_tree / "all/train/555（冰炫）/broken.jpg")
    good = write_image(tmp_path / "g.jpg", 0, size=(200, 200))
    (tmp_path / "t.jpg").write_bytes(good.read_bytes()[:-400])  # cut the tail off
    with pytest.raises(CorruptImageError):
        load_rgb(tmp_path / "t.jpg")


def test_draft_decode_keeps_at_least_the_requested_shorter_side(tmp_path):
    path = write_image(tmp_path / "big.jpg", 0, size=(1000, 1300))
    image = load_rgb(path, min_shorter_side=240)
    assert 240 <= min(image.size) < 1000


def test_metadata_maps_classes_and_reports_gaps(quirky_tree):
    index = scan_rp2k(quirky_tree, metadata=quirky_tree / "metadata.csv")
    by_name = {c.name: c for c in index.classes}
    assert by_name["伊利纯牛奶250ml"].type == "dairy"
    assert by_name["伊利纯牛奶250ml"].product.sku == "000123"  # leading zeros kept
    assert by_name["青岛啤酒 经典（500ml）"].shape == "can"  # normalised to lower case
    assert by_name["东古黄豆酱750G"].type == "unknown"
    assert index.report.without_metadata == ["东古黄豆酱750G"]
    assert index.report.metadata_without_folder == ["不存在"]


def test_without_metadata_every_class_is_unknown(quirky_tree):
    index = scan_rp2k(quirky_tree)
    assert {c.type for c in index.classes} == {"unknown"}
    assert {c.shape for c in index.classes} == {"unknown"}


def test_metadata_columns_are_configurable_and_parquet_works(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"folder": ["a"], "category": ["Liquor"], "form": ["bottle"]}), tmp_path / "m.parquet")
    columns = MetadataColumns(class_folder="folder", type="category", shape="form", sku=None)
    info = load_metadata(tmp_path / "m.parquet", columns)["a"]
    assert (info.type, info.shape, info.sku) == ("liquor", "bottle", "")
    with pytest.raises(MetadataError, match="no class-folder column 'class'"):
        load_metadata(tmp_path / "m.parquet")
    with pytest.raises(MetadataError, match="unknown metadata column keys"):
        MetadataColumns.from_mapping({"colour": "c"})


def test_bad_metadata_gives_clear_errors(tmp_path):
    with pytest.raises(MetadataError, match="does not exist"):
        load_metadata(tmp_path / "nope.csv")
    (tmp_path / "dup.csv").write_text("class,type\na,dairy\na,beer\n")
    with pytest.raises(MetadataError, match="appears twice"):
        load_metadata(tmp_path / "dup.csv")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(MetadataError, match="cannot read"):
        load_metadata(tmp_path / "bin.csv")


def test_plain_layout_is_accepted(tmp_path):
    write_image(tmp_path / "train" / "a" / "1.jpg", 1)
    write_image(tmp_path / "test" / "a" / "2.jpg", 2)
    index = scan_rp2k(tmp_path)
    assert index.layout == "plain"
    assert [r.relpath for r in index.records["test"]] == ["test/a/2.jpg"]


def test_missing_root_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetLayoutError, match=r"all/train/<class>/<image>.*rp2k synth"):
        scan_rp2k(tmp_path / "missing")
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetLayoutError, match="holds neither"):
        scan_rp2k(tmp_path / "stuff")


def test_scan_is_deterministic(quirky_tree, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(quirky_tree, copy)
    a, b = scan_rp2k(quirky_tree), scan_rp2k(copy)
    assert [c.name for c in a.classes] == [c.name for c in b.classes]
    assert a.records == b.records
