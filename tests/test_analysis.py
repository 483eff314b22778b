"""Analysis outputs on a real (one-epoch, in-process) run: UMAP figure, report, comparison,
prediction on files, export."""

from __future__ import annotations

import base64
import json
import re
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from rp2k_dist.analysis import iter_shard_images
from rp2k_dist.analysis import run as run_module
from rp2k_dist.analysis.export import export_onnx, export_safetensors
from rp2k_dist.evaluation.predict import COLUMNS, predict_folder, predict_images
from rp2k_dist.analysis.compare import compare_runs
from rp2k_dist.analysis.report import write_report
from rp2k_dist.analysis.umap_plot import DPI, FIGSIZE, embed_and_project, plot_umap, project, select_samples
from rp2k_dist.config import load_config
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.evaluation.inference import load_trained, logits_of, predict_shards
from rp2k_dist.errors import DataError
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides


def _train(shards, storage_path, name: str, extra: tuple[str, ...] = ()):
    config = load_config(None, tiny_run_overrides(shards.root, storage_path, name, epochs=1) + list(extra))
    storage = RunStorage(config.run.storage_path, config.run.name)
    torch.manual_seed(0)
    train_worker(config, LocalContext(storage, "cpu"))
    return storage.local_path()


@pytest.fixture(scope="module")
def run_dir(synth_shards, tmp_path_factory):
    """A finished one-epoch ResNet-34 run on the synthetic set."""
    return _train(synth_shards, tmp_path_factory.mktemp("runs"), "general")


@pytest.fixture(scope="module")
def trained(run_dir):
    return load_trained(run_dir, device="cpu")


def _copy_run(run_dir: Path, target: Path, changes: dict[str, object] | None = None) -> Path:
    """The run folder without checkpoints, with config values changed (``{"run.name": ...}``)."""
    shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "epoch_*"))
    config = yaml.safe_load((target / "config.yaml").read_text(encoding="utf-8"))
    for key, value in (changes or {}).items():
        section, name = key.split(".")
        config[section][name] = value
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


# -- UMAP ---------------------------------------------------------------------------------


def test_umap_figure_has_two_coloured_panels_and_a_row_per_sample(run_dir, synth_shards, tmp_path):
    df = embed_and_project(run_dir, split="test")
    assert len(df) == synth_shards.num_samples("test")
    assert {"key", "class", "class_name", "type", "shape", "features", "umap_x", "umap_y"} <= set(df.columns)
    assert np.isfinite(df[["umap_x", "umap_y"]].to_numpy()).all()
    assert len(df["features"].iloc[0]) == 512  # ResNet-34's pooled features

    png = plot_umap(df, tmp_path / "umap.png", "test run")
    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert image.shape[1::-1] == (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)  # (width, height)
    coloured = (image.max(axis=2) - image.min(axis=2)) > 80  # saturated: markers, not text or axes
    half = image.shape[1] // 2
    assert coloured[:, :half].sum() > 50 and coloured[:, half:].sum() > 50
    table = pd.read_parquet(tmp_path / "umap.parquet")
    assert len(table) == len(df) and table["key"].tolist() == df["key"].tolist()


def test_umap_subsample_is_deterministic_and_bounded(synth_shards):
    first = select_samples(synth_shards, "train", max_samples=25, seed=3)
    again = select_samples(synth_shards, "train", max_samples=25, seed=3)
    other = select_samples(synth_shards, "train", max_samples=25, seed=4)
    assert len(first) == 25 and first["key"].tolist() == again["key"].tolist() != other["key"].tolist()
    assert first["key"].is_monotonic_increasing


def test_umap_projects_a_handful_of_points():
    features = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert project(features).shape == (5, 2)
    with pytest.raises(DataError, match="at least 3"):
        project(features[:2])


# -- report and comparison ----------------------------------------------------------------


def test_report_table2_matches_predictions_and_html_is_self_contained(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path / "run")
    Image.new("RGB", (40, 30), (200, 30, 30)).save(run / "umap.png")
    evaluation = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    (run / "ensemble.json").write_text(json.dumps({
        "rule": "top1", "table2": evaluation["table2"],
        "table3": [{"meta_category": "liquor", "samples": 7, "general_top1": 42.857, "general_top5": 71.4286,
                    "restricted_top1": 57.1429, "restricted_top5": 85.7143, "specialist_top1": 100.0,
                    "specialist_top5": 100.0, "ensemble_top1": 85.7143, "ensemble_top5": 100.0,
                    "routing_recall": 85.7143, "routed_in": 2}],
    }), encoding="utf-8")

    md_path, html_path = write_report(run, tmp_path / "report")
    md_path, html_path = Path(md_path), Path(html_path)
    md = md_path.read_text(encoding="utf-8")
    predictions = pd.read_parquet(run / "predictions.parquet")
    for system in ("type", "shape"):
        for group, rows in predictions.groupby(system):
            top1, top5 = 100 * rows["correct_top1"].mean(), 100 * rows["correct_top5"].mean()
            assert re.search(rf"\| {re.escape(group)} \| {len(rows)} \| {top1:.2f} \| \[[\d.]+, [\d.]+\] \| "
                             rf"{top5:.2f} \| \[[\d.]+, [\d.]+\] \|", md), group
    overall = f"| average (micro) | {len(predictions)} | {100 * predictions['correct_top1'].mean():.2f} |"
    assert overall in md
    assert "not RP2K's 2,388" in md and "paper top-1" not in md.split("## Table 3")[0]
    # Table 3: (a)-(e) as top-1 / top-5, each rule's routing recall / precision, the mass
    # threshold; no paper columns. This ensemble.json predates (e) and the precision: "–"
    assert ("| liquor | 7 | 42.86 / 71.43 | 57.14 / 85.71 | 100.00 / 100.00 | 85.71 / 100.00 | – | 85.71 / – | – "
            "| – |") in md
    assert ("The specialists helped (the top-1 routed ensemble (d) against the general model (a), paired on the same "
            "images): liquor (d) 85.7 % vs (a) 42.9 % top-1 (point estimates, no interval).") in md
    for heading in ("## Training curves", "## Most confused pairs", "## UMAP", "## Configuration"):
        assert heading in md
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", md):
        assert (md_path.parent / image).exists(), image

    page = html_path.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "<script" not in page
    # every embedded image is a whole PNG in strict base64 (no URL can hide in one)
    assert all(base64.b64decode(s.split(",", 1)[1], validate=True).startswith(b"\x89PNG\r\n") for s in sources)
    assert page.count("<table>") == len(re.findall(r"(?m)^\|---", md))


def test_report_shows_the_paper_columns_on_real_rp2k(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "REAL_RP2K_MIN_CLASSES", 1)  # pretend the synthetic set is RP2K
    md = Path(write_report(run_dir, tmp_path)[0]).read_text(encoding="utf-8")
    assert "| meta-category | samples | top-1 | 95 % CI | top-5 | 95 % CI | paper top-1 | paper top-5 |" in md
    assert re.search(r"\| average \(micro\) \| \d+ \| [\d.]+ \| \[.+?\] \| [\d.]+ \| \[.+?\] \| 95\.18 \| 99\.01 \|", md)


def test_compare_puts_runs_side_by_side_with_table4(run_dir, tmp_path):
    no_augment = {f"augment.{key}": False for key in ("border", "crop", "perspective", "brightness")}
    changes = {"run.name": "transfer", "model.pretrained": "imagenet", **no_augment}
    other = _copy_run(run_dir, tmp_path / "other", changes)
    md = Path(compare_runs([run_dir, other], tmp_path / "compare.md")).read_text(encoding="utf-8")
    evaluation = json.loads((run_dir / "evaluation.json").read_text(encoding="utf-8"))
    top1 = f"{evaluation['table2']['overall']['top1']:.2f}"
    scratch = r"\| general \| resnet34 \| scratch \| on \| from scratch \+ augmentation \|"
    transfer = r"\| transfer \| resnet34 \| imagenet \| off \| transfer learning \(ImageNet\) \|"
    for row in (scratch, transfer):
        assert re.search(rf"{row} 0\.99 \| 1 of 1 \| {top1} \|", md), row
    assert "| transfer learning + augmentation | 90.89 | 95.01 |" in md  # the paper's Table 4


# -- prediction ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(synth_shards, tmp_path_factory):
    """Test images written from the shards (JPEG bytes as is; one re-saved as lossless
    PNG), a truncated JPEG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    keys = sorted(k for k in synth_shards.index().column("key").to_pylist() if k.startswith("test"))[:12]
    images = dict(iter_shard_images(synth_shards, keys))
    for key in keys[1:]:
        (folder / f"{key}.jpg").write_bytes(images[key])
    (folder / "nested").mkdir()
    Image.open(BytesIO(images[keys[0]])).save(folder / "nested" / f"{keys[0]}.png")
    (folder / "broken.jpg").write_bytes(images[keys[1]][:300])
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    return folder


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_predict_matches_evaluation_and_rejects_bad_files(trained, synth_shards, image_folder):
    files = _files(image_folder)
    results, rejected = predict_images(trained, files, batch_size=5)
    reference = predict_shards(trained, synth_shards.root, workers=0)
    row_of = {key: i for i, key in enumerate(reference.keys)}
    assert len(results) == len(files) - 2
    for result in results:
        i = row_of[Path(result["path"]).stem]
        assert [t["class"] for t in result["top5"]] == reference.topk[i].tolist()
        np.testing.assert_allclose([t["score"] for t in result["top5"]], reference.scores[i], atol=1e-4)
        best = result["top5"][0]
        info = trained.classes[best["class"]]
        assert (best["name"], best["sku"], best["type"], best["shape"]) == (
            info["name"], info["sku"], info["type"], info["shape"])
    reasons = {Path(r["path"]).name: r for r in rejected}
    assert set(reasons) == {"broken.jpg", "notes.txt"}
    assert reasons["broken.jpg"]["error"] == "corrupt" and "cannot decode" in reasons["broken.jpg"]["reason"]
    assert reasons["notes.txt"]["error"] == "unsupported" and "'.txt'" in reasons["notes.txt"]["reason"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_predict_folder_writes_the_table(trained, image_folder, tmp_path, suffix):
    summary = predict_folder(trained, image_folder, tmp_path / f"predictions{suffix}")
    read = {".parquet": pd.read_parquet, ".csv": pd.read_csv, ".json": pd.read_json}[suffix]
    table = read(summary.out)
    assert list(table.columns) == COLUMNS
    assert summary.images == len(_files(image_folder)) - 2 and len(summary.rejected) == 2
    assert len(table) == 5 * summary.images + 2
    assert table["error"].notna().sum() == 2


def test_predict_routes_to_a_specialist(trained, synth_shards, image_folder, tmp_path):
    files = _files(image_folder)
    alone, _ = predict_images(trained, files)
    types = synth_shards.meta_categories("type")
    top1_types = [types[result["top5"][0]["class"]] for result in alone]
    chosen = max(set(top1_types), key=top1_types.count)  # so that some images are routed
    # batch 8: whichever category is chosen, its train share holds a full batch
    run = _train(synth_shards, tmp_path, "specialist", (f"data.meta_category=type={chosen}", "data.batch_size=8"))
    specialist = load_trained(run, device="cpu")
    own, _ = predict_images(specialist, files)  # the specialist alone, classes as global indices
    ensemble, _ = predict_images(trained, files, specialists=[specialist])
    width = min(5, len(specialist.class_subset))
    for plain, mine, routed, category in zip(alone, own, ensemble, top1_types):
        if category == chosen:
            assert routed["routed_to"] == chosen and routed["top5"][:width] == mine["top5"][:width]
        else:
            assert routed["routed_to"] is None and routed["top5"] == plain["top5"]
    assert sum(r["routed_to"] == chosen for r in ensemble) == top1_types.count(chosen) > 0


@pytest.mark.slow
def test_predict_folder_with_ray_data_gives_the_same_table(ray_cluster, run_dir, image_folder, tmp_path):
    from rp2k_dist.evaluation.predict import predict_folder_ray

    plain = pd.read_parquet(predict_folder(run_dir, image_folder, tmp_path / "plain.parquet").out)
    summary = predict_folder_ray(run_dir, image_folder, tmp_path / "ray.parquet", batch_size=4, actors=2)
    distributed = pd.read_parquet(summary.out)
    key = ["path", "rank"]
    plain, distributed = (t.sort_values(key, kind="stable").reset_index(drop=True) for t in (plain, distributed))
    pd.testing.assert_frame_equal(plain.drop(columns="score"), distributed.drop(columns="score"))
    np.testing.assert_allclose(plain["score"].fillna(0), distributed["score"].fillna(0), atol=1e-5)
    assert len(summary.rejected) == 2


# -- export -------------------------------------------------------------------------------


def test_onnx_export_matches_pytorch_logits(trained, tmp_path):
    import onnxruntime

    result = export_onnx(trained, tmp_path / "model.onnx")
    assert result.max_abs_diff <= 1e-3 and result.opset >= 17
    images = torch.randint(0, 256, (5, 3, trained.spec.crop_size, trained.spec.crop_size), dtype=torch.uint8)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.numpy()})[0]
    np.testing.assert_allclose(got, logits_of(trained, images).numpy(), atol=1e-3)
    card = json.loads(Path(result.card).read_text(encoding="utf-8"))
    assert [c["name"] for c in card["classes"]] == [c["name"] for c in trained.classes]
    assert card["input_spec"]["crop_size"] == trained.spec.crop_size


def test_safetensors_round_trip_equals_the_state_dict(trained, tmp_path):
    from safetensors.torch import load_file

    result = export_safetensors(trained, tmp_path / "model.safetensors")
    loaded = load_file(result.path)
    state = trained.model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    card = json.loads(Path(result.card).read_text(encoding="utf-8"))
    assert card["model_name"] == "resnet34" and card["model_args"] == trained.checkpoint["model_args"]
    assert [c["sku"] for c in card["classes"]] == [c["sku"] for c in trained.classes]


def test_confused_pairs_figure_names_the_classes(run_dir, synth_shards, tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from rp2k_dist.analysis.fonts import drawable
    from rp2k_dist.analysis.plots import confusion_examples, pair_label
    from rp2k_dist.analysis.run import Run

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    pairs = json.loads((run_dir / "evaluation.json").read_text(encoding="utf-8"))["confused_pairs"][:3]
    assert pairs
    confusion_examples(Run.read(run_dir), synth_shards, pairs, tmp_path / "confusions.png")
    titles = [axes.get_title() for axes in saved[-1].axes if axes.get_title()]
    classes = synth_shards.classes
    for pair, title in zip(pairs, titles[::2]):
        true = classes[pair["true"]]
        assert pair_label(pair, "true") == (true["product_name"] or true["name"]) and pair["true_sku"] == true["sku"]
        # the name where a font draws it (a CJK font for the Chinese names), else the SKU
        shown = pair_label(pair, "true") if drawable(pair_label(pair, "true")) else f"SKU {true['sku']}"
        assert f"true #{pair['true']} {shown[:31]}" in title
        assert f"predicted #{pair['predicted']}" in title


def test_compare_aggregates_seeds_and_pairs_groups_on_the_same_images(run_dir, tmp_path):
    seeds = [_copy_run(run_dir, tmp_path / f"base-s{i}", {"run.name": f"base-s{i}"}) for i in range(2)]
    other = [_copy_run(run_dir, tmp_path / f"other-s{i}", {"run.name": f"other-s{i}"}) for i in range(2)]
    # the other group gets every test image right in seed 1: a gain that the pairing sees
    predictions = pd.read_parquet(other[1] / "predictions.parquet")
    predictions["correct_top1"] = True
    predictions.to_parquet(other[1] / "predictions.parquet")
    md = Path(compare_runs(seeds + other, tmp_path / "compare.md")).read_text(encoding="utf-8")
    top1 = json.loads((run_dir / "evaluation.json").read_text())["table2"]["overall"]["top1"]
    assert f"| **base** (mean ± std) | resnet34 |" in md and f"{top1:.1f} ± 0.0 (2 seeds)" in md
    n = len(predictions)
    wrong = int((~pd.read_parquet(run_dir / "predictions.parquet")["correct_top1"]).sum())
    line = next(line for line in md.splitlines() if line.startswith("- other - base"))
    # the mean of the seeds' gains (0 and all the wrong ones), on the n images both seeds share
    assert f"mean of 2 seed pairs): helped: +{100 * wrong / (2 * n):.1f} points" in line and f"on {n} images" in line
    same = Path(compare_runs(seeds, tmp_path / "same.md")).read_text(encoding="utf-8")
    assert "Paired differences" not in same  # one group: nothing to pair
