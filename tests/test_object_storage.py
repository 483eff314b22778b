"""Object storage as users have it: a real S3 server (SeaweedFS on loopback), pyarrow URIs."""

from __future__ import annotations

import pytest

from rp2k_dist import storage
from rp2k_dist.cli import main
from rp2k_dist.config import AugmentConfig, DataConfig
from rp2k_dist.data.loader import LoaderConfig, ShardLoader
from rp2k_dist.data.manifest import Manifest
from rp2k_dist.data.pack import PackConfig, pack_dataset
from rp2k_dist.data.rp2k import scan_rp2k
from rp2k_dist.data.transforms import EvalTransform, TrainTransform
from rp2k_dist.input_spec import InputSpec
from rp2k_dist.data.verify import verify_shards

SPEC = InputSpec(32, 36)
PACK = PackConfig(samples_per_shard=12, shorter_side=48, workers=1)


def test_join_keeps_the_query_apart_from_the_path():
    base = "s3://rp2k/shards?endpoint_override=127.0.0.1:8333&scheme=http"
    assert storage.join(base, "dataset.json") == "s3://rp2k/shards/dataset.json?endpoint_override=127.0.0.1:8333&scheme=http"
    assert storage.join(base + "", "a/", "/b.tar") == "s3://rp2k/shards/a/b.tar?endpoint_override=127.0.0.1:8333&scheme=http"
    assert storage.join("s3://rp2k/", "x") == "s3://rp2k/x"
    assert storage.display(base) == "s3://rp2k/shards"
    assert storage.join("/data/shards", "dataset.json") == "/data/shards/dataset.json"


@pytest.fixture(scope="module")
def s3_pack(s3_server, small_tree):
    """The small tree packed straight into the bucket (endpoint in the URI's query)."""
    uri = s3_server.uri("packs", "small")
    return uri, pack_dataset(scan_rp2k(small_tree), uri, PACK)


def test_pack_to_s3_writes_shards_and_manifest_and_a_rerun_resumes(s3_server, small_tree, s3_pack, monkeypatch):
    import rp2k_dist.data.pack as pack

    uri, manifest = s3_pack
    names = storage.listdir(uri)
    shards = [s.name for split in ("train", "test") for s in manifest.shards(split)]
    assert set(shards) | {"dataset.json", "index.parquet", ".pack"} == set(names)
    assert not [n for n in names if "partial" in n or ".tmp" in n]  # only complete objects
    for split in ("train", "test"):
        for shard in manifest.shards(split):
            assert storage.size(manifest.location(shard.name)) == shard.bytes
    # a pack killed before its manifest: the rerun encodes only the shard that is missing
    fs, path = storage.resolve(manifest.location("dataset.json"))
    fs.delete_file(path)
    fs.delete_file(storage.resolve(manifest.location(shards[1]))[1])
    written = []
    real = pack._write_shard
    monkeypatch.setattr(pack, "_write_shard", lambda *a: written.append(a[2].name) or real(*a))
    again = pack_dataset(scan_rp2k(small_tree), uri, PACK)
    assert written == [shards[1]]
    assert again.data == Manifest.load(uri).data == manifest.data


def test_verify_on_s3_passes_then_catches_a_flipped_byte(s3_server, s3_pack, capsys):
    uri, manifest = s3_pack
    assert verify_shards(uri) == []
    assert main(["verify", uri]) == 0
    victim = manifest.shards("train")[2]
    row = next(r for r in manifest.index().to_pylist() if r["shard"] == victim.name)
    location = manifest.location(victim.name)
    data = bytearray(storage.read_bytes(location))
    data[row["offset"] + row["length"] // 2] ^= 0xFF
    storage.write_bytes(location, bytes(data))
    try:
        problems = [str(p) for p in verify_shards(uri)]
        assert problems == [f"{victim.name}: sample {row['key']}: image bytes differ from the manifest (sha256)"]
        capsys.readouterr()
        assert main(["verify", uri]) == 1
        assert f"BAD {victim.name}" in capsys.readouterr().out
    finally:
        data[row["offset"] + row["length"] // 2] ^= 0xFF
        storage.write_bytes(location, bytes(data))
    assert verify_shards(uri) == []


def test_endpoint_from_the_environment_works_like_the_uri_parameters(s3_server, s3_pack, monkeypatch):
    uri, manifest = s3_pack
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{s3_server.endpoint}")
    storage._filesystem.cache_clear()
    try:
        plain = storage.display(uri)  # s3://rp2k/packs/small, no query
        assert Manifest.load(plain).data == manifest.data
        assert verify_shards(plain) == []
    finally:
        monkeypatch.undo()
        storage._filesystem.cache_clear()


def test_loader_streams_s3_shards_by_byte_range(s3_server, s3_pack):
    uri, manifest = s3_pack
    local_keys = None
    for source in (manifest, Manifest.load(storage.join(uri))):
        loader = ShardLoader(source, "test", EvalTransform(SPEC), LoaderConfig(DataConfig(batch_size=4, loader_workers=0)), train=False)
        keys = [k for b in loader for k in b["key"]]
        local_keys = local_keys or keys
        assert keys == local_keys and len(keys) == manifest.num_samples("test")
    read, split_bytes = 0, sum(s.bytes for s in manifest.shards("train"))
    for rank in range(3):
        loader = ShardLoader(manifest, "train", TrainTransform(SPEC, AugmentConfig()),
                             LoaderConfig(DataConfig(batch_size=4, loader_workers=2, chunk_mb=0.05)), rank, 3)
        assert len(list(loader)) == len(loader)
        read += loader.stats.bytes_read
    assert 0.9 * split_bytes <= read <= 1.05 * split_bytes


def test_wrong_credentials_name_the_bucket_and_the_variables_and_write_nothing(s3_server, small_tree, monkeypatch, capsys):
    uri = s3_server.uri("packs", "denied")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage._filesystem.cache_clear()  # filesystems hold the credentials they were built with
    try:
        assert main(["pack", str(small_tree), uri, "--samples-per-shard", "12", "--workers", "1"]) == 2
        out, err = capsys.readouterr()
        assert "bucket 'rp2k'" in err and "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err
        assert "cannot look up s3://rp2k/packs/denied" in err and "not-the-secret" not in err
        assert "samples in" not in out and "manifest:" not in out
    finally:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
        storage._filesystem.cache_clear()
    assert storage.listdir(uri) == []


def test_a_failed_upload_raises_instead_of_being_logged(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    storage._filesystem.cache_clear()
    target = s3_server.uri("runs", "x", "metrics.jsonl")
    try:
        with pytest.raises(storage.StorageError, match="cannot write s3://rp2k/runs/x/metrics.jsonl"):
            storage.write_bytes(target, b"{}")
    finally:
        monkeypatch.undo()
        storage._filesystem.cache_clear()
    assert not storage.exists(target)


@pytest.mark.slow
def test_train_from_s3_shards_with_s3_checkpoints_resume_and_predict(ray_cluster, s3_server, s3_pack, synth_shards):
    from rp2k_dist.config import load_config
    from rp2k_dist.evaluation.inference import load_trained, predict_shards
    from rp2k_dist.launch.trainer import read_metrics, run_training
    from tests.conftest import tiny_run_overrides

    shards = s3_server.uri("packs", "synth")
    pack_dataset_from_local(synth_shards, shards)
    runs = s3_server.uri("runs")
    # the cluster's workers hold the server's credentials (tests.conftest.ray_worker_env)
    run_training(load_config(None, tiny_run_overrides(shards, runs, "s3run", epochs=1)))
    config = load_config(None, tiny_run_overrides(shards, runs, "s3run", epochs=2))
    final = run_training(config)
    history = read_metrics(config)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["resumed_from_epoch"] == 1
    assert final["val_samples"] == synth_shards.num_samples("test")
    run = storage.join(runs, "s3run")
    assert [n for n in storage.listdir(run) if n.startswith("epoch_")] == ["epoch_0001", "epoch_0002"]
    predictions = predict_shards(load_trained(run, device="cpu"), shards, workers=0)
    assert sorted(predictions.keys) == sorted(r["key"] for r in synth_shards.index().to_pylist() if r["split"] == "test")


def pack_dataset_from_local(manifest: Manifest, uri: str) -> None:
    """Upload a packed folder as it is (what users do after packing locally)."""
    for name in storage.listdir(manifest.location_root):
        if not name.startswith("."):
            storage.write_bytes(storage.join(uri, name), storage.read_bytes(manifest.location(name)))
