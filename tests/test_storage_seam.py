"""Everything after training on object storage: the same runs on a local disk and in a real
S3 server (SeaweedFS on loopback) give the same ensemble, UMAP, report, comparison,
predictions and exports, byte for byte where the output is deterministic."""

from __future__ import annotations

import json
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rp2k_dist import run_folder, storage
from rp2k_dist.cli import main
from rp2k_dist.config import load_config
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.errors import ConfigError, StorageError
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides

GENERAL, SPECIALIST = "general", "specialist"


def _train(shards, storage_path: Path, name: str, extra: list[str]) -> Path:
    config = load_config(None, tiny_run_overrides(shards.root, storage_path, name, epochs=1) + extra)
    folder = RunStorage(config.run.storage_path, config.run.name)
    torch.manual_seed(0)
    train_worker(config, LocalContext(folder, "cpu"))
    return folder.local_path()


def upload(local: Path, uri: str, edit_config: dict[str, str] | None = None) -> None:
    """A local folder copied object by object (``config.yaml`` with ``edit_config`` applied)."""
    for name in storage.walk(local):
        data = (local / name).read_bytes()
        if name == run_folder.CONFIG and edit_config:
            config = yaml.safe_load(data)
            for key, value in edit_config.items():
                section, field = key.split(".")
                config[section][field] = value
            data = yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode()
        storage.write_bytes(storage.join(uri, name), data)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    """``s3://rp2k/seam``, reached through ``AWS_ENDPOINT_URL`` (URIs carry no query)."""
    return f"s3://{s3_endpoint.bucket}/seam"


@pytest.fixture(scope="module")
def runs(synth_shards, bucket, tmp_path_factory):
    """A general ResNet-34 and an API-Net specialist of one type (one epoch each), trained
    locally; shards and runs copied to the bucket, whose config.yaml names the bucket's
    shards. Returns {"local": {...}, "s3": {...}}: shards, general, specialist, out."""
    base = tmp_path_factory.mktemp("seam")
    types = synth_shards.meta_categories("type")
    counts = synth_shards.class_counts("train")
    category = max(set(types), key=lambda t: sum(1 for i, x in enumerate(types) if x == t and counts[i] >= 2))
    general = _train(synth_shards, base / "runs", GENERAL, [])
    specialist = _train(synth_shards, base / "runs", SPECIALIST, [
        "model.name=apinet", f"model.weights={run_folder.find_checkpoint(general)}",
        f"data.meta_category=type={category}", "data.classes_per_batch=2", "data.images_per_class=2",
        "model.freeze_backbone_epochs=0"])
    shards = f"{bucket}/shards"
    upload(synth_shards.root, shards)
    bucket_runs = f"{bucket}/runs"
    for run in (general, specialist):
        upload(run, storage.join(bucket_runs, run.name), {"data.shards": shards})
    return {"local": {"shards": str(synth_shards.root), "general": str(general), "specialist": str(specialist),
                      "out": str(base / "out")},
            "s3": {"shards": shards, "general": storage.join(bucket_runs, GENERAL),
                   "specialist": storage.join(bucket_runs, SPECIALIST), "out": f"{bucket}/out"}}


def read(location: str) -> bytes:
    return storage.read_bytes(location)


def same_files(local: str, remote: str, names: list[str]) -> None:
    for name in names:
        assert read(storage.join(local, name)) == read(storage.join(remote, name)), name


def test_the_bucket_holds_the_same_runs(runs):
    local, s3 = runs["local"], runs["s3"]
    assert storage.walk(local["general"]) == storage.walk(s3["general"])
    assert run_folder.find_run_dir(storage.join(s3["general"], "epoch_0001", run_folder.CHECKPOINT)) == s3["general"]
    assert s3["general"] == "s3://rp2k/seam/runs/general"


def test_ensemble_on_s3_equals_local(runs):
    from rp2k_dist.evaluation.ensemble_eval import evaluate_ensemble

    outputs = {}
    for where, at in runs.items():
        out = storage.join(at["out"], "ensemble")
        result = evaluate_ensemble(at["general"], [at["specialist"]], at["shards"], out, workers=0)
        outputs[where] = (out, result)
    (local, first), (remote, second) = outputs["local"], outputs["s3"]
    assert first.table3 == second.table3 and first.markdown == second.markdown
    names = storage.walk(local)
    category = first.table3[0]["meta_category"]
    assert names == storage.walk(remote) == sorted([
        run_folder.ENSEMBLE, run_folder.TABLE3, run_folder.ENSEMBLE_TABLE2, run_folder.ENSEMBLE_PREDICTIONS,
        run_folder.ENSEMBLE_MASS_PREDICTIONS,
        run_folder.ENSEMBLE_GENERAL_PREDICTIONS, run_folder.ensemble_category_predictions(category, "specialist"),
        run_folder.ensemble_category_predictions(category, "restricted")])
    same_files(local, remote, [n for n in names if n != run_folder.ENSEMBLE])  # Markdown and Parquet, byte for byte
    saved = {where: json.loads(read(storage.join(out, run_folder.ENSEMBLE))) for where, (out, _) in outputs.items()}
    assert saved["s3"].pop("specialists") == [runs["s3"]["specialist"]]
    saved["local"].pop("specialists")
    assert saved["local"] == saved["s3"]


def test_umap_on_s3_equals_local(runs, capsys):
    for at in runs.values():
        assert main(["umap", at["general"], "--shards", at["shards"], "--max-samples", "40", "--workers", "1",
                     "--out", storage.join(at["out"], "umap")]) == 0
    assert "s3://rp2k/seam/out/umap/umap.png and s3://rp2k/seam/out/umap/umap.parquet" in capsys.readouterr().out
    local, remote = (storage.join(at["out"], "umap") for at in runs.values())
    tables = [pd.read_parquet(BytesIO(read(storage.join(out, run_folder.UMAP_PARQUET)))) for out in (local, remote)]
    pd.testing.assert_frame_equal(*tables)
    assert len(tables[0]) == 40
    same_files(local, remote, [run_folder.UMAP_PNG, run_folder.UMAP_PARQUET])


def _without_locations(text: str, at: dict[str, str]) -> str:
    """A report with the run folder's and the dataset's locations taken out."""
    for location in (at["general"], at["shards"]):
        text = text.replace(location, "LOCATION")
    return text


def test_report_on_s3_equals_local(runs, capsys):
    for at in runs.values():
        assert main(["report", at["general"]]) == 0  # into <run>/report
    assert "report: s3://rp2k/seam/runs/general/report/report.md" in capsys.readouterr().out
    local, remote = (storage.join(at["general"], run_folder.REPORT_DIR) for at in runs.values())
    names = storage.walk(local)
    assert names == storage.walk(remote)
    assert {run_folder.CURVES_PNG, run_folder.CATEGORIES_PNG, run_folder.CONFUSIONS_PNG} <= set(names)
    same_files(local, remote, [n for n in names if n.endswith(".png")])
    for suffix in ("md", "html"):
        texts = [_without_locations(storage.read_text(storage.join(out, f"{run_folder.REPORT}.{suffix}")), at)
                 for out, at in zip((local, remote), runs.values())]
        assert texts[0] == texts[1]
        assert texts[0].count("LOCATION") == 3  # the run folder, the dataset, the dataset in config.yaml


def test_compare_on_s3_equals_local(runs, capsys):
    for at in runs.values():
        assert main(["compare", at["general"], at["specialist"], "--out", storage.join(at["out"], "compare")]) == 0
    assert "written to s3://rp2k/seam/out/compare/compare.md" in capsys.readouterr().out
    same = [read(storage.join(at["out"], "compare", run_folder.COMPARE)) for at in runs.values()]
    assert same[0] == same[1] and f"| {SPECIALIST} | apinet |" in same[0].decode()


def test_predict_on_s3_equals_local(runs, synth_shards):
    from rp2k_dist.analysis import iter_shard_images

    keys = sorted(k for k in synth_shards.index().column("key").to_pylist() if k.startswith("test"))[:10]
    images = dict(iter_shard_images(runs["s3"]["shards"], keys))  # ranged reads from the bucket
    assert images == dict(iter_shard_images(synth_shards, keys))
    tables = []
    for at in runs.values():
        folder = storage.join(at["out"], "images")
        for key, jpeg in images.items():
            storage.write_bytes(storage.join(folder, "shelf", f"{key}.jpg"), jpeg)
        storage.write_bytes(storage.join(folder, "notes.txt"), b"not an image")
        out = storage.join(at["out"], "predictions.parquet")
        assert main(["predict", at["general"], folder, "--out", out, "--specialist", at["specialist"],
                     "--workers", "1"]) == 0
        table = pd.read_parquet(BytesIO(read(out)))
        table["path"] = table["path"].str.replace(storage.display(folder), "FOLDER", regex=False)
        tables.append(table)
    pd.testing.assert_frame_equal(*tables)
    assert tables[0]["path"].nunique() == len(images) + 1 and tables[0]["path"].str.startswith("FOLDER/").all()
    assert (tables[0]["error"] == "unsupported").sum() == 1


def test_export_on_s3_equals_local(runs):
    import onnxruntime
    from safetensors import safe_open
    from safetensors.torch import load

    for at in runs.values():
        assert main(["export", at["general"], storage.join(at["out"], "export")]) == 0
    local, remote = (storage.join(at["out"], "export") for at in runs.values())
    cards = [run_folder.model_card(run_folder.MODEL_SAFETENSORS), run_folder.model_card(run_folder.MODEL_ONNX)]
    assert storage.walk(local) == storage.walk(remote) == sorted(cards + [run_folder.MODEL_ONNX, run_folder.MODEL_SAFETENSORS])
    same_files(local, remote, cards)
    # safetensors orders its header's metadata as a hash map does (per process), so the files
    # are compared by their tensors and metadata
    weights = [load(read(storage.join(out, run_folder.MODEL_SAFETENSORS))) for out in (local, remote)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    metadata = []
    for out in (local, remote):
        copy = Path(runs["local"]["out"]) / f"check-{len(metadata)}.safetensors"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(read(storage.join(out, run_folder.MODEL_SAFETENSORS)))
        with safe_open(copy, "pt") as handle:
            metadata.append(handle.metadata())
    assert metadata[0] == metadata[1] == {"format": "pt", "model_name": "resnet34"}
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    logits = [onnxruntime.InferenceSession(read(storage.join(out, run_folder.MODEL_ONNX)),
                                           providers=["CPUExecutionProvider"]).run(["logits"], {"images": images})[0]
              for out in (local, remote)]
    # two exports of one model in one process can differ in the graph's internal names, so the
    # ONNX files are compared by what they compute
    np.testing.assert_allclose(*logits, rtol=1e-5, atol=1e-5)


def test_a_failed_upload_is_an_error_and_leaves_nothing(runs, bucket, monkeypatch):
    from rp2k_dist.analysis.compare import compare_runs
    from rp2k_dist.analysis.report import write_report

    target = f"{bucket}/denied"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    storage._filesystem.cache_clear()  # filesystems hold the credentials they were built with
    try:
        with pytest.raises(StorageError, match="cannot write s3://rp2k/seam/denied/compare.md"):
            compare_runs([runs["local"]["general"]], storage.join(target, run_folder.COMPARE))
        with pytest.raises(StorageError, match="s3://rp2k/seam/denied"):
            write_report(runs["local"]["general"], target)
    finally:
        monkeypatch.undo()
        storage._filesystem.cache_clear()
    assert storage.walk(target) == []


def test_a_sweeps_best_yaml_in_the_bucket_is_a_preset(bucket):
    config = load_config("table2_resnet34", ["optim.epochs=3", "run.name=sweep-best"])
    location = f"{bucket}/sweeps/beta/{run_folder.BEST}"
    storage.write_text(location, config.to_yaml())
    assert load_config(location) == config  # `rp2k train s3://…/best.yaml` as `rp2k tune` prints it
    with pytest.raises(ConfigError, match="not found"):
        load_config(f"{bucket}/sweeps/none/{run_folder.BEST}")
