"""Metadata tables whose columns need mapping: what `rp2k pack` says, and what it keeps."""

from __future__ import annotations

import json
import tarfile

from rp2k_dist.cli import main
from rp2k_dist.data.manifest import Manifest
from tests.conftest import make_tree


def _tree_with_table(tmp_path):
    root = make_tree(tmp_path / "rp2k", classes=2, per_class=5)
    (root / "metadata.csv").write_text(
        "class,sku_id,product_name,type,origin\n"
        "类别 0,00017,Milk,Dairy,Inner Mongolia\n"
        "类别 1,00042,Beer,beer,\n", encoding="utf-8")
    return root


def _pack(capsys, root, out, *flags: str) -> list[str]:
    assert main(["pack", str(root), str(out), "--workers", "1", "--shorter-side", "32", *flags]) == 0
    return capsys.readouterr().out.splitlines()


def test_pack_lists_the_columns_and_warns_about_unmapped_fields(capsys, tmp_path):
    root = _tree_with_table(tmp_path)
    lines = _pack(capsys, root, tmp_path / "shards")
    assert "metadata columns: class, sku_id, product_name, type, origin" in lines
    assert "mapped: class_folder <- class, type <- type" in lines
    assert "unmapped columns (kept per class as extra): sku_id, product_name, origin" in lines
    warnings = [line for line in lines if line.startswith("warning:")]
    assert [w.split()[1] for w in warnings] == ["sku", "name", "brand", "shape", "size", "flavour"]
    assert "--metadata-column sku=sku_id" in warnings[0] and "--metadata-column name=product_name" in warnings[1]
    manifest = Manifest.load(tmp_path / "shards")
    assert [c["sku"] for c in manifest.classes] == ["", ""]
    # unmapped columns are kept, per class and in every sample's metadata
    assert manifest.classes[0]["extra"] == {"sku_id": "00017", "product_name": "Milk", "origin": "Inner Mongolia"}
    assert manifest.classes[1]["extra"] == {"sku_id": "00042", "product_name": "Beer"}
    with tarfile.open(manifest.shard_paths("train")[0]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert metas and all(m["extra"]["sku_id"] in ("00017", "00042") for m in metas)


def test_pack_with_the_mapping_fills_the_fields(capsys, tmp_path):
    root = _tree_with_table(tmp_path)
    lines = _pack(capsys, root, tmp_path / "shards", "--metadata-column", "sku=sku_id",
                  "--metadata-column", "name=product_name")
    assert "mapped: class_folder <- class, sku <- sku_id, name <- product_name, type <- type" in lines
    assert not any(line.startswith(("warning: sku", "warning: name")) for line in lines)
    manifest = Manifest.load(tmp_path / "shards")
    assert [(c["sku"], c["product_name"], c["type"]) for c in manifest.classes] == [
        ("00017", "Milk", "dairy"), ("00042", "Beer", "beer")]
    assert manifest.classes[0]["extra"] == {"origin": "Inner Mongolia"}
    assert "extra" not in manifest.classes[1]  # nothing left over
