"""Packing: fields, manifest, determinism, resume after a kill, and verify."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import webdataset as wds

from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.pack import PackConfig, PackError, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.verify import verify_shards
from tests.conftest import make_tree


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def quirky_pack(quirky_tree, tmp_path_factory) -> Manifest:
    index = scan_rp2k(quirky_tree, quirky_tree / "metadata.csv")
    return pack_dataset(index, tmp_path_factory.mktemp("qp") / "out", PackConfig(samples_per_shard=2, shorter_side=40, workers=1))


def test_samples_hold_image_class_and_json_metadata(quirky_pack):
    samples = list(wds.WebDataset(quirky_pack.shard_paths("train"), shardshuffle=False))
    rows = {r["key"]: r for r in quirky_pack.index().to_pylist()}
    assert len(samples) == quirky_pack.num_samples("train") == 5  # 6 files, one corrupt
    for sample in samples:
        row = rows[sample["__key__"]]
        meta = json.loads(sample["json"])
        assert int(sample["cls"]) == row["label"]
        assert meta["source"] == row["source"] and meta["type"] == row["type"]
        assert hashlib.sha256(sample["jpg"]).hexdigest() == row["sha256"]
        assert sample["jpg"][:2] == b"\xff\xd8"  # re-encoded JPEG, PNGs included
        assert "." not in sample["__key__"]
    assert len(rows) == len(set(rows))


def test_images_resized_to_the_shorter_side_with_aspect_kept(quirky_pack):
    from rp2k_dist.data.transforms import decode

    sample = next(iter(wds.WebDataset(quirky_pack.shard_paths("train"), shardshuffle=False)))
    image = decode(sample["jpg"])
    assert min(image.size) == 40
    assert image.size == (40, 53)  # 48x64 source, aspect 3:4


def test_manifest_class_table_counts_and_skips(quirky_pack):
    data = quirky_pack.data
    classes = {c["name"]: c for c in data["classes"]}
    assert classes["伊利纯牛奶250ml"]["type"] == "dairy"
    assert classes["伊利纯牛奶250ml"]["counts"] == {"train": 2, "test": 1}
    assert classes["555（冰炫）"]["counts"] == {"train": 2, "test": 1}  # the corrupt one is skipped
    assert classes["东古黄豆酱750G"]["counts"] == {"train": 0, "test": 1}
    assert [s["source"] for s in data["skipped"]] == ["all/train/555（冰炫）/broken.jpg"]
    assert data["scan_report"]["empty_classes"] == ["空的"]
    assert sum(s["samples"] for s in data["splits"]["train"]["shards"]) == data["splits"]["train"]["samples"]
    for shard in quirky_pack.shards("train") + quirky_pack.shards("test"):
        path = quirky_pack.root / shard.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard.sha256
        assert path.stat().st_size == shard.bytes
    assert quirky_pack.class_counts("train") == [c["counts"]["train"] for c in data["classes"]]


def test_pack_is_deterministic_whatever_the_worker_count(small_tree, tmp_path):
    index = scan_rp2k(small_tree)
    a = pack_dataset(index, tmp_path / "a", PackConfig(samples_per_shard=7, shorter_side=48, workers=1))
    b = pack_dataset(index, tmp_path / "b", PackConfig(samples_per_shard=7, shorter_side=48, workers=2))
    assert _digests(a.root) == _digests(b.root)
    c = pack_dataset(index, tmp_path / "c", PackConfig(samples_per_shard=7, shorter_side=48, workers=1, seed=1))
    assert _digests(a.root)["train-000000.tar"] != _digests(c.root)["train-000000.tar"]


def test_shard_size_target_sets_samples_per_shard(small_tree, tmp_path):
    m = pack_dataset(scan_rp2k(small_tree), tmp_path / "o", PackConfig(shard_size_mb=0.1, shorter_side=48, workers=1))
    sizes = [s.bytes for s in m.shards("train")]
    assert len(sizes) > 3
    assert max(sizes[:-1]) < 0.1e6 * 1.2 and min(sizes[:-1]) > 0.1e6 * 0.8


def test_killed_pack_resumes_to_an_identical_manifest(tmp_path):
    tree = make_tree(tmp_path / "tree", classes=4, per_class=40, size=(160, 200))
    reference = pack_dataset(scan_rp2k(tree), tmp_path / "ref", PackConfig(samples_per_shard=4, workers=1))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "rp2k_dist.cli", "pack", str(tree), str(out),
               "--samples-per-shard", "4", "--workers", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / ".pack").glob("*.tar.json"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name: p.stat().st_ino for p in out.glob("*.tar") if (out / ".pack" / f"{p.name}.json").exists()}
    assert not (out / "dataset.json").exists(), "killed too late: the pack had finished"
    assert 3 <= len(finished) < len(reference.shards("train")) + len(reference.shards("test"))
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    assert _digests(out) == _digests(reference.root)
    # shards finished before the kill were kept, not rewritten
    still = {p.name: p.stat().st_ino for p in out.glob("*.tar")}
    assert all(still[name] == inode for name, inode in finished.items())


def test_finished_pack_is_reused_and_a_foreign_folder_refused(small_tree, tmp_path):
    index = scan_rp2k(small_tree)
    config = PackConfig(samples_per_shard=50, shorter_side=48, workers=1)
    first = pack_dataset(index, tmp_path / "o", config)
    mtime = (first.root / "dataset.json").stat().st_mtime_ns
    pack_dataset(index, tmp_path / "o", config)
    assert (first.root / "dataset.json").stat().st_mtime_ns == mtime
    with pytest.raises(PackError, match="a different pack"):
        pack_dataset(index, tmp_path / "o", PackConfig(samples_per_shard=9, shorter_side=48, workers=1))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(PackError, match="not a pack"):
        pack_dataset(index, tmp_path / "junk", config)
    pack_dataset(index, tmp_path / "o", PackConfig(samples_per_shard=9, shorter_side=48, workers=1), overwrite=True)


def test_verify_names_a_flipped_byte_and_a_missing_shard(small_tree, tmp_path):
    m = pack_dataset(scan_rp2k(small_tree), tmp_path / "o", PackConfig(samples_per_shard=10, shorter_side=48, workers=1))
    assert verify_shards(m.root) == []
    shards = m.shards("train")
    victim = m.root / shards[1].name
    with tarfile.open(victim) as tar:
        member = next(x for x in tar.getmembers() if x.name.endswith(".jpg"))
        offset = member.offset_data + member.size // 2
    data = bytearray(victim.read_bytes())
    data[offset] ^= 0xFF
    victim.write_bytes(bytes(data))
    (m.root / shards[2].name).unlink()
    problems = [str(p) for p in verify_shards(m.root)]
    key = member.name[: -len(".jpg")]
    assert any(shards[1].name in p and key in p and "differ" in p for p in problems)
    assert any(shards[2].name in p and "missing" in p for p in problems)
    assert len(problems) == 2


def test_verify_cli_exit_codes(small_tree, tmp_path):
    from rp2k_dist.cli import main

    m = pack_dataset(scan_rp2k(small_tree), tmp_path / "o", PackConfig(samples_per_shard=50, shorter_side=48, workers=1))
    assert main(["verify", str(m.root)]) == 0
    shard = m.root / m.shards("test")[0].name
    shard.write_bytes(shard.read_bytes()[:1000])
    assert main(["verify", str(m.root)]) == 1
    assert main(["verify", str(tmp_path / "nothing")]) == 2
