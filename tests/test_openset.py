"""Products the model never trained on: unseen classes, the cosine head, embeddings,
galleries (FAISS) and the open-set table. Models here are untrained (a seeded random
ResNet-34 at 32 px written as a checkpoint): the tests check mechanics and numbers, not
what training gives (bench/openset_heads.py measures that)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from rp2k_dist.config import ConfigError, load_config
from rp2k_dist.data.holdout import held_out_classes
from rp2k_dist.engine.run_data import build_loaders
from rp2k_dist.errors import GalleryModelMismatchError
from rp2k_dist.data.tar_index import iter_shard_images
from rp2k_dist.data.transforms import EvalTransform
from rp2k_dist.evaluation.embeddings import (
    Embedded, embed_samples, embed_source, embeddings_of, folder_samples, model_id, read_embeddings, write_embeddings,
)
from rp2k_dist.evaluation.gallery import UNKNOWN, Gallery, recall_against_exact
from rp2k_dist.evaluation.gallery_build import add_to_gallery, answers, build_gallery, predict_with_gallery
from rp2k_dist.evaluation.ood_scores import calibrate_threshold
from rp2k_dist.evaluation.inference import features_of, load_trained
from rp2k_dist.evaluation.openset import auroc, evaluate_openset
from rp2k_dist.losses import ClassBalancedLoss
from rp2k_dist.models import create_model, input_spec
from rp2k_dist.models.cosine import CosineHead
from rp2k_dist.run_folder import OPENSET, OPENSET_TABLE, checkpoint_dir, to_bytes
from tests.conftest import tiny_run_overrides
from tests.helpers import untrained_run


def _classes(types: list[str]) -> list[dict]:
    return [{"index": i, "name": f"c{i}", "type": t, "counts": {"train": 5, "test": 2}} for i, t in enumerate(types)]


def test_held_out_classes_are_a_stratified_deterministic_draw():
    classes = _classes(["liquor"] * 6 + ["beer"] * 2)
    chosen = held_out_classes(classes, 4)
    assert chosen == held_out_classes(list(reversed(classes)), 4)  # from the class table alone
    types = [classes[c]["type"] for c in chosen]
    assert types.count("liquor") == 3 and types.count("beer") == 1  # 4 x 6/8 and 4 x 2/8
    assert len(held_out_classes(classes, 0.25)) == 2 and held_out_classes(classes, 0) == []
    assert held_out_classes(classes, ["c3", 1]) == [1, 3]
    with pytest.raises(ConfigError, match="neither class names"):
        held_out_classes(classes, ["nope"])
    with pytest.raises(ConfigError, match="some must stay seen"):
        held_out_classes(classes, 8)
    with pytest.raises(ConfigError, match="holdout_classes"):
        load_config(None, ["data.holdout_classes=-1"])
    with pytest.raises(ConfigError, match="model.head"):
        load_config(None, ["model.head=cosine", "model.name=inception_v3"])


def test_cosine_head_weights_each_margin_loss_by_its_class_balanced_weight():
    torch.manual_seed(0)
    head = CosineHead(4, 3, "cosface", margin=0.35, scale=10.0)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4) + 0.1)
    features, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 3])
    cosine = torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(head.weight, dim=0)
    assert torch.allclose(head(features), 10.0 * cosine, atol=1e-5)  # evaluation logits: scaled cosines, no margin
    margin = cosine - 0.35 * torch.nn.functional.one_hot(labels, 4)  # CosFace: cos(theta_y) - m
    by_hand = torch.nn.functional.cross_entropy(10.0 * margin, labels, reduction="none")
    losses = head.losses(features, labels)
    assert torch.allclose(losses, by_hand, atol=1e-5)
    criterion = ClassBalancedLoss([1000, 100, 10, 1], beta=0.99)  # Cui et al.'s worked example
    assert torch.allclose(criterion.weights, torch.tensor([0.035389, 0.055818, 0.370088, 3.538705]), atol=1e-5)
    weighted = criterion.weighted(losses, labels)
    expected = sum(w * l for w, l in zip([0.035389, 0.055818, 0.370088, 3.538705, 0.035389, 3.538705], by_hand)) / 6
    assert weighted.detach().item() == pytest.approx(float(expected), rel=1e-4)
    # the model routes its training output through the criterion's weights
    model = create_model("resnet34", 4, head="cosine", margin_loss="arcface", scale=16.0)
    model.train()
    output = model(torch.randn(4, 3, 32, 32), labels[:4])
    assert output.losses.shape == (4,)
    assert model.loss(output, labels[:4], criterion).item() == pytest.approx(
        float((criterion.weights[labels[:4]] * output.losses).mean()), rel=1e-5)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).abs().max() <= 16.0 + 1e-4


@pytest.fixture(scope="module")
def run(synth_shards, tmp_path_factory):
    """A cosine-head checkpoint of an untrained ResNet-34 with 3 unseen classes and a 20 %
    validation split, written as the engine writes it."""
    root = tmp_path_factory.mktemp("openset")
    config = load_config(None, tiny_run_overrides(synth_shards.root, root, "cos") + [
        "model.head=cosine", "data.holdout_classes=3", "data.holdout=0.2"])
    made = untrained_run(config, root / "cos")
    return {"dir": root / "cos", "config": config, "root": root, **made}


def test_unseen_classes_never_reach_training_batches(run):
    data, config = run["data"], run["config"]
    assert len(data.unseen) == 3 and all(data.train_counts[c] == 0 for c in data.unseen)
    assert sum(data.train_counts) > 0 and [c["global_index"] for c in data.classes] == list(range(len(data.classes)))
    train, evaluation = build_loaders(config, data, input_spec("resnet34", 32), 0, 1, torch.device("cpu"))
    train.set_epoch(0)
    labels = torch.cat([b["label"] for b in train])
    index = data.manifest.index().to_pandas().set_index("key")
    unseen_keys = set(index.index[index["label"].isin(data.unseen)])
    keys = [k for b in train for k in b["key"]]
    assert len(labels) > 0 and not set(labels.tolist()) & set(data.unseen) and not set(keys) & unseen_keys
    assert not {int(x) for b in evaluation for x in b["label"]} & set(data.unseen)  # Table 2: seen classes only
    criterion_weights = ClassBalancedLoss(data.train_counts, 0.99).weights
    assert all(criterion_weights[c] == 0 for c in data.unseen)


def test_embeddings_are_unit_norm_deterministic_and_written_with_the_model_id(run, synth_shards, tmp_path):
    first = embed_source(run["dir"], synth_shards.root, "test")
    trained = load_trained(run["dir"])
    some = first.table.iloc[::5]
    again = embed_samples(trained, some[["key", "split", "class", "name", "sku", "type", "shape"]], synth_shards,
                          batch_size=3, workers=1)  # other batches, other order of decoding
    vectors = np.stack(first.table["embedding"])
    assert len(first.table) == synth_shards.num_samples("test")
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.stack(some["embedding"]), np.stack(again.table["embedding"]), atol=1e-6)
    assert first.model_id == model_id(trained) and first.model_id.startswith("sha256:")
    # the embedding is the normalised pooled feature, the vector the cosine head compares with W
    jpegs = dict(iter_shard_images(synth_shards, list(some["key"][:4])))  # in shard order
    images = torch.stack([EvalTransform(trained.spec)(jpegs[key]) for key in some["key"][:4]])
    pooled = torch.nn.functional.normalize(features_of(trained, images), dim=1).numpy()
    assert np.allclose(embeddings_of(trained, images).numpy(), pooled, atol=1e-6)
    assert np.allclose(pooled, np.stack(some["embedding"][:4]), atol=1e-5)
    write_embeddings(first, tmp_path / "e.parquet")
    back = read_embeddings(tmp_path / "e.parquet")
    assert back.model_id == first.model_id and np.array_equal(np.stack(back.table["embedding"]), vectors)
    assert set(back.table["class"]) <= set(range(synth_shards.num_classes))
    # an image folder is labelled by its sub-folders, matched to the model's classes by name
    labelled = folder_samples(synth_shards.root.parent / "rp2k" / "all" / "test", trained.classes)
    assert len(labelled) > 0 and (labelled["class"] >= 0).all()
    assert (labelled["class"].map(lambda c: synth_shards.classes[c]["name"]) == labelled["name"]).all()


def _reencoded(source: Path, target: Path) -> Path:
    """Copies of the photos under ``source``, resized by 10 % and saved at JPEG quality 70."""
    target.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        image = Image.open(path).convert("RGB")
        image = image.resize((int(image.width * 0.9), int(image.height * 0.9)))
        image.save(target / f"{path.stem}.jpg", quality=70)
    return target


def test_gallery_add_makes_a_new_product_recognisable_without_retraining(run, synth_shards, tmp_path):
    unseen = run["data"].unseen[0]
    name = synth_shards.classes[unseen]["name"]
    photos = synth_shards.root.parent / "rp2k" / "all" / "train" / name
    gallery_dir = tmp_path / "gallery"
    built = build_gallery(run["dir"], synth_shards.root, gallery_dir, per_class=3, threshold=0.0)
    assert built.gallery.index_kind == "flat" and len(built.gallery) > 0
    queries = _reencoded(photos, tmp_path / "queries")
    predict_with_gallery(run["dir"], queries, gallery_dir, tmp_path / "before.csv")
    before = answers(pd.read_csv(tmp_path / "before.csv", dtype=str).assign(rank=lambda t: t["rank"].astype(int)))
    assert "NEW-SKU" not in before.values()
    _, added, _ = add_to_gallery(gallery_dir, photos, "NEW-SKU")
    assert added == len(list(photos.iterdir()))
    predict_with_gallery(run["dir"], queries, gallery_dir, tmp_path / "after.parquet")
    after = answers(pd.read_parquet(tmp_path / "after.parquet"))
    assert sum(a == "NEW-SKU" for a in after.values()) >= 0.8 * len(after)


def test_a_gallery_refuses_another_model(run, synth_shards, tmp_path):
    build_gallery(run["dir"], synth_shards.root, tmp_path / "g", per_class=1, threshold=0.5)
    other = dict(run["checkpoint"])
    other["model"] = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in other["model"].items()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "checkpoint.pt").write_bytes(to_bytes(other))
    photos = synth_shards.root.parent / "rp2k" / "all" / "test" / synth_shards.classes[0]["name"]
    with pytest.raises(GalleryModelMismatchError, match="not comparable"):
        predict_with_gallery(tmp_path / "other", photos, tmp_path / "g", tmp_path / "p.csv")
    with pytest.raises(GalleryModelMismatchError):
        add_to_gallery(tmp_path / "g", photos, "X", checkpoint=tmp_path / "other")


def test_a_gallery_on_s3_equals_the_local_one(run, synth_shards, s3_server, tmp_path):
    local = build_gallery(run["dir"], synth_shards.root, tmp_path / "g", per_class=1, threshold=0.5)
    uri = s3_server.uri("galleries", "g")
    remote = build_gallery(run["dir"], synth_shards.root, uri, per_class=1, threshold=0.5)
    loaded = Gallery.load(uri)
    assert loaded.manifest() == Gallery.load(tmp_path / "g").manifest() == local.gallery.manifest()
    assert np.array_equal(loaded.vectors, remote.gallery.vectors) and loaded.index.ntotal == len(loaded)
    photos = synth_shards.root.parent / "rp2k" / "all" / "test" / synth_shards.classes[1]["name"]
    predict_with_gallery(run["dir"], photos, uri, tmp_path / "s3.csv")
    predict_with_gallery(run["dir"], photos, tmp_path / "g", tmp_path / "local.csv")
    assert (tmp_path / "s3.csv").read_text() == (tmp_path / "local.csv").read_text()


def _clusters(rng, centres: np.ndarray, n: int, spread: float) -> np.ndarray:
    points = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1]))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_a_product_outside_the_gallery_is_unknown_at_the_calibrated_threshold():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 32))
    labels = np.repeat(np.arange(5), 4)
    gallery_vectors = np.stack([_clusters(rng, centres[[c]], 1, 0.05)[0] for c in labels])
    table = pd.DataFrame({"key": [f"g{i}" for i in range(len(labels))], "split": "train", "class": labels,
                          "name": [f"sku{c}" for c in labels], "sku": [f"sku{c}" for c in labels],
                          "type": "liquor", "shape": "bottle"})
    gallery = Gallery.create(Embedded(table.assign(embedding=list(gallery_vectors)), [], "sha256:x"))
    validation = _clusters(rng, centres[:5], 200, 0.05)
    best = np.array([m[0].score for m in gallery.rank(validation, k=1)])
    gallery.threshold = calibrate_threshold(best, 0.95)
    assert np.mean(best >= gallery.threshold) >= 0.95 and np.mean(best > gallery.threshold) < 0.95
    unseen = _clusters(rng, centres[5:], 50, 0.05)  # the sixth product has no gallery image
    assert all(gallery.answer(m) == UNKNOWN for m in gallery.rank(unseen))
    seen = gallery.rank(_clusters(rng, centres[2:3], 20, 0.05))
    assert sum(gallery.answer(m) == "sku2" for m in seen) >= 18
    assert auroc(best, np.array([m[0].score for m in gallery.rank(unseen, k=1)])) == 1.0
    assert auroc(np.array([0.2, 0.6]), np.array([0.4])) == 0.5 and math.isnan(auroc(np.array([]), np.array([1.0])))


def test_ivf_recall_is_measured_against_the_exact_search():
    rng = np.random.default_rng(1)
    vectors = _clusters(rng, rng.standard_normal((64, 32)), 4000, 0.3)
    queries = _clusters(rng, rng.standard_normal((64, 32)), 200, 0.3)
    recall = recall_against_exact(vectors, queries, k=10, nlist=32, nprobes=(1, 32))
    assert recall[32] == pytest.approx(1.0)  # every cell searched: exact
    assert 0.1 < recall[1] < 1.0  # one cell of 32: approximate


def test_openset_writes_its_table_for_a_run_with_unseen_classes(run, synth_shards):
    result = evaluate_openset(run["dir"])
    overall = result.overall
    assert overall.group == "all" and overall.unseen_classes == 3 and overall.unseen_test > 0
    assert {c["class"] for c in result.unseen} == set(run["data"].unseen)
    assert 0.0 <= overall.auroc <= 1.0 and 0.0 <= overall.far <= 100.0
    # with k = 5 and at most 3 unseen classes every query's class is in its top 5
    assert overall.recall["r@5 1-shot"] == overall.recall["r@5 5-shot"] == 100.0
    assert overall.recall["r@1 1-shot"] <= overall.recall["r@5 1-shot"]
    assert (run["dir"] / OPENSET).exists() and "| all | " in (run["dir"] / OPENSET_TABLE).read_text()
    # every figure with its interval; strict JSON (categories without unseen classes: null, not NaN)
    low, high = overall.intervals["auroc"]
    assert low <= overall.auroc <= high and f"{overall.auroc:.3f} [{low:.3f}, {high:.3f}]" in result.to_markdown()
    assert overall.intervals["r@5 1-shot"] == [100.0, 100.0]
    import json

    def refuse(constant):
        raise AssertionError(f"openset.json holds {constant}")

    written = json.loads((run["dir"] / OPENSET).read_text(), parse_constant=refuse)
    assert type(result).from_dict(written).to_markdown() == result.to_markdown()
    json.dumps(written, allow_nan=False)
    # the score is chosen on validation-unseen classes and reported on test-unseen ones: disjoint, never trained on
    assert not set(result.validation_unseen) & set(result.test_unseen)
    assert sorted(result.validation_unseen + result.test_unseen) == sorted(run["data"].unseen)
    assert result.validation_unseen and all(run["data"].train_counts[c] == 0 for c in result.validation_unseen + result.test_unseen)
    assert {s["score"] for s in written["scores"]} == {"msp", "max_logit", "energy", "knn", "gallery"}
    chosen = next(s for s in written["scores"] if s["score"] == written["chosen"])
    assert chosen["validation_auroc"] == max(s["validation_auroc"] for s in written["scores"])
    assert result.threshold == chosen["threshold"] and overall.far == chosen["far"]
    assert "**(chosen)**" in (run["dir"] / OPENSET_TABLE).read_text() and "Chosen on validation" in result.full_markdown()
    for s in (1, 5):  # a gallery of every class is a harder search space than the unseen classes alone
        for k in (1, 5):
            assert overall.recall[f"catalogue r@{k} {s}-shot"] <= overall.recall[f"r@{k} {s}-shot"]
    assert 0.0 <= overall.accuracy <= 100.0


def test_an_earlier_epoch_is_not_given_the_runs_closed_set_table(run, synth_shards, tmp_path):
    """The closed-set columns come from the run's evaluation.json, which is its latest
    checkpoint's: an earlier epoch's open-set table leaves them empty instead of borrowing them."""
    import shutil

    folder = tmp_path / "cos"
    shutil.copytree(run["dir"], folder, ignore=shutil.ignore_patterns("openset*"))
    shutil.copytree(folder / checkpoint_dir(1), folder / checkpoint_dir(2))  # a later epoch
    (folder / "evaluation.json").write_text(json.dumps({"table2": {"overall": {"top1": 12.5, "top5": 50.0}}}))
    assert evaluate_openset(folder, out=tmp_path / "latest").overall.top1 == 12.5
    earlier = evaluate_openset(folder / checkpoint_dir(1), out=tmp_path / "earlier").overall
    assert math.isnan(earlier.top1) and math.isnan(earlier.top5) and 0.0 <= earlier.auroc <= 1.0


def test_a_gallery_records_the_runs_score_and_recognises_an_added_sku(run, synth_shards, tmp_path):
    result = evaluate_openset(run["dir"])  # openset.json: the score chosen on validation
    built = build_gallery(run["dir"], synth_shards.root, tmp_path / "g", per_class=3)
    recorded = json.loads((tmp_path / "g" / "gallery.json").read_text())
    assert recorded["score"] == result.chosen and "chosen on validation" in recorded["score_source"]
    assert recorded["threshold"] is not None and built.calibration_queries > 0
    override = build_gallery(run["dir"], synth_shards.root, tmp_path / "msp", per_class=3, score="msp")
    assert override.gallery.score == "msp" and override.gallery.similarity_threshold is not None
    unseen = run["data"].unseen[0]
    photos = synth_shards.root.parent / "rp2k" / "all" / "train" / synth_shards.classes[unseen]["name"]
    queries = _reencoded(photos, tmp_path / "queries")
    for gallery in (tmp_path / "g", tmp_path / "msp"):
        add_to_gallery(gallery, photos, "NEW-SKU")
        predict_with_gallery(run["dir"], queries, gallery, tmp_path / "after.parquet")
        table = pd.read_parquet(tmp_path / "after.parquet")
        after = answers(table)
        assert sum(a == "NEW-SKU" for a in after.values()) >= 0.8 * len(after)
        assert table["open_set_score"].notna().all()


@pytest.mark.slow
def test_embed_with_ray_equals_one_process(run, synth_shards, tmp_path):
    import ray

    from rp2k_dist.evaluation.embeddings import embed_source_ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with_ray = embed_source_ray(run["dir"], synth_shards.root, "test", batch_size=16, actors=1)
    finally:
        ray.shutdown()
    one = embed_source(run["dir"], synth_shards.root, "test")
    table = with_ray.table.sort_values("key").reset_index(drop=True)
    assert table["key"].tolist() == one.table["key"].tolist() and with_ray.model_id == one.model_id
    assert table["class"].tolist() == one.table["class"].tolist()
    assert np.allclose(np.stack(table["embedding"]), np.stack(one.table["embedding"]), atol=1e-6)
