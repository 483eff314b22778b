"""The training engine in one process (no Ray): learning, resume, checkpoints, failures."""

from __future__ import annotations

import json
import re
import math

import pytest
import torch

from rp2k_dist.config import ConfigError, load_config
from rp2k_dist.run_folder import CHECKPOINT, checkpoint_dir, load_checkpoint, resume_mismatch
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.optim import warmup_cosine
from rp2k_dist.engine.train import NonFiniteLossError, train_worker
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides


def _run(shards, tmp_path, name, extra=(), epochs=2):
    config = load_config(None, tiny_run_overrides(shards.root, tmp_path, name, epochs) + list(extra))
    storage = RunStorage(config.run.storage_path, config.run.name)
    return config, storage, train_worker(config, LocalContext(storage, "cpu"))


def _history(storage):
    return [json.loads(line) for line in storage.read_bytes("metrics.jsonl").decode().splitlines()]


LEARN_EPOCHS = 8


@pytest.fixture(scope="module")
def learned(synth_shards, tmp_path_factory):
    """One 8-epoch run, read (never changed) by the tests of what a run learns and leaves."""
    torch.manual_seed(0)
    return _run(synth_shards, tmp_path_factory.mktemp("learn"), "learn", ["loss.cbl_beta=0.9"], epochs=LEARN_EPOCHS)


def test_single_process_run_learns(learned, synth_shards):
    _, storage, final = learned
    history = _history(storage)
    chance = 100.0 / synth_shards.num_classes
    assert final["val_top1"] > 4 * chance, history
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert [m["epoch"] for m in history] == list(range(1, LEARN_EPOCHS + 1))


def test_run_leaves_config_metrics_predictions_and_table(learned, synth_shards):
    config, storage, final = learned
    assert load_config(storage.local_path("config.yaml")) == config
    evaluation = json.loads(storage.read_bytes("evaluation.json"))
    assert evaluation["table2"]["overall"]["top1"] == pytest.approx(final["val_top1"])
    assert final["val_samples"] == synth_shards.num_samples("test")
    import pyarrow.parquet as pq

    predictions = pq.read_table(storage.local_path("predictions.parquet"))
    assert predictions.num_rows == synth_shards.num_samples("test")
    assert "| meta-category |" in storage.read_bytes("table2.md").decode()


def test_checkpoint_is_self_describing_and_weights_only(learned, synth_shards):
    _, storage, _ = learned
    path = storage.local_path(checkpoint_dir(LEARN_EPOCHS)) / CHECKPOINT
    raw = torch.load(path, weights_only=True)  # no pickled code needed
    checkpoint = load_checkpoint(path)
    assert raw["epoch"] == checkpoint["epoch"] == LEARN_EPOCHS
    assert checkpoint["model_name"] == "resnet34"
    assert checkpoint["model_args"] == {"num_classes": synth_shards.num_classes}
    assert [c["name"] for c in checkpoint["classes"]] == synth_shards.class_names
    assert checkpoint["input_spec"]["crop_size"] == 32
    assert {"optimizer", "scheduler", "rng", "config", "metrics"} <= set(checkpoint)
    assert len(checkpoint["metrics"]) == LEARN_EPOCHS


def test_rerun_resumes_from_the_last_checkpoint(synth_shards, tmp_path):
    _, storage, _ = _run(synth_shards, tmp_path, "resume", epochs=2)
    first = _history(storage)
    _, storage, final = _run(synth_shards, tmp_path, "resume", epochs=3)
    history = _history(storage)
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[:2] == first  # epochs 1-2 were not run again
    assert final["epoch"] == 3
    # the finished run is not trained again
    _, _, again = _run(synth_shards, tmp_path, "resume", epochs=3)
    assert _history(storage) == history


#: choose the delivered epoch on the validation split (run.select_epoch), keeping every checkpoint
SELECT = ["data.holdout=0.2", "run.select_epoch=holdout", "run.keep_checkpoints=3"]


def _scripted_validation(monkeypatch, top1_by_epoch: dict[int, float]) -> None:
    """The epoch choice sees these validation top-1s (the tiny set's own are noise); the
    metrics still record the measured ones."""
    from rp2k_dist.engine.selection import SelectedEpoch

    consider = SelectedEpoch.consider
    monkeypatch.setattr(SelectedEpoch, "consider",
                        lambda self, epoch, top1, model: consider(self, epoch, top1_by_epoch[epoch], model))


def _weights(storage, epoch):
    return load_checkpoint(storage.local_path(checkpoint_dir(epoch)) / CHECKPOINT)


def test_resume_continues_identically_to_an_uninterrupted_run(synth_shards, tmp_path, monkeypatch):
    # epoch 1 validates best, so the resumed run must carry that choice over from its checkpoint
    _scripted_validation(monkeypatch, {1: 80.0, 2: 60.0})
    extra = ["run.checkpoint_every=1", "augment.perspective=false", *SELECT]
    _, whole, _ = _run(synth_shards, tmp_path, "whole", extra, epochs=2)
    _run(synth_shards, tmp_path, "split", extra, epochs=2)
    # drop the last checkpoint and the last epoch's metrics: as if it died in epoch 2
    split = RunStorage(str(tmp_path), "split")
    assert split.exists(checkpoint_dir(2))
    split.delete_dir(checkpoint_dir(2))
    _run(synth_shards, tmp_path, "split", extra, epochs=2)
    a, b = _history(whole)[-1], _history(split)[-1]
    assert b["resumed_from_epoch"] == 1  # epoch 2 really ran again
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert a["selected_epoch"] == b["selected_epoch"] == 1
    delivered = [_weights(whole, 2), _weights(split, 2)]
    assert delivered[0]["selected"]["epoch"] == delivered[1]["selected"]["epoch"] == 1
    for name, value in delivered[0]["model"].items():
        torch.testing.assert_close(delivered[1]["model"][name], value, rtol=1e-4, atol=1e-5)


def test_select_epoch_holdout_delivers_the_epoch_that_validated_best(synth_shards, tmp_path, monkeypatch):
    from rp2k_dist.data.chunks import SampleTable
    from rp2k_dist.data.holdout import HOLDOUT

    _scripted_validation(monkeypatch, {1: 50.0, 2: 80.0, 3: 80.0})  # a tie keeps the earlier epoch
    _, storage, final = _run(synth_shards, tmp_path, "select", SELECT, epochs=3)
    history = _history(storage)
    assert [m["selected_epoch"] for m in history] == [1, 2, 2]
    holdout = len(SampleTable.from_manifest(synth_shards, HOLDOUT, holdout=0.2))
    assert holdout > 0 and all(m["holdout_samples"] == holdout for m in history)
    # the final checkpoint holds epoch 2's weights, and the test split was predicted with them
    delivered, second = _weights(storage, 3), _weights(storage, 2)
    assert delivered["selected"]["epoch"] == 2 and delivered["epoch"] == 3
    for name, value in second["model"].items():
        torch.testing.assert_close(delivered["model"][name], value)
    assert final["selected_val_top1"] == pytest.approx(history[1]["val_top1"])
    evaluation = json.loads(storage.read_bytes("evaluation.json"))
    assert evaluation["table2"]["overall"]["top1"] == pytest.approx(history[1]["val_top1"])
    assert evaluation["final"]["selected_epoch"] == 2
    # the validation-test gap of the choice: validation top-1 at the delivered epoch minus test
    gap = evaluation["validation_gap"]
    assert (gap["selected_epoch"], gap["validation_top1"]) == (2, history[1]["holdout_top1"])
    assert gap["gap"] == pytest.approx(history[1]["holdout_top1"] - history[1]["val_top1"])
    assert len(gap["per_epoch"]) == 3


def test_select_epoch_holdout_without_held_out_images_of_the_run_s_classes_is_a_config_error(synth_shards, tmp_path):
    # the largest class has 44 train images: 1 % of it rounds to none
    with pytest.raises(ConfigError, match=r"run.select_epoch=holdout: data.holdout=0.01 holds out no train image"):
        _run(synth_shards, tmp_path, "none", ["data.holdout=0.01", "run.select_epoch=holdout"], epochs=1)


def test_nan_loss_stops_the_run_with_a_clear_error(synth_shards, tmp_path):
    with pytest.raises(NonFiniteLossError, match="lower optim.lr"):
        _run(synth_shards, tmp_path, "nan", ["optim.lr=1e30"], epochs=1)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4), reason="no fused CPU kernels")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizer_on_cpu_takes_the_steps_of_the_per_tensor_one(optimizer):
    from rp2k_dist.engine.optim import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)]
    models[1].load_state_dict(models[0].state_dict())
    start = models[0].weight.detach().clone()
    optimizers = [build_optimizer(model, load_config(None, [f"optim.optimizer={optimizer}", f"optim.fused={fused}"]), 256)[0]
                  for model, fused in zip(models, ("true", "false"))]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    x, y = torch.randn(16, 8), torch.arange(16) % 3
    for _ in range(3):
        for model, optimizer in zip(models, optimizers):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    assert (models[0].weight - start).abs().max() > 1e-3  # the steps moved it
    torch.testing.assert_close(models[0].weight, models[1].weight)
    torch.testing.assert_close(models[0].bias, models[1].bias)


def test_warmup_then_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.01)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-9)


def test_frozen_backbone_steps_run_at_the_full_rate_and_the_warmup_follows_them():
    official = warmup_cosine(total_steps=100, warmup_steps=0, warmup_start=8)  # API-Net: no warm-up
    assert official(0) == 1.0 and official(50) == pytest.approx(0.5)
    factor = warmup_cosine(total_steps=100, warmup_steps=10, warmup_start=20)
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * step / 90))  # over the 90 steps outside the warm-up
    assert factor(0) == 1.0 and factor(19) == pytest.approx(cosine(19))  # frozen: the head at the full rate
    assert factor(20) == pytest.approx(0.01 * cosine(20))  # the backbone unfreezes at 1 % of the rate
    assert factor(25) == pytest.approx((0.01 + 0.99 * 0.5) * cosine(20))
    assert factor(30) == pytest.approx(cosine(20)) and factor(100) == pytest.approx(0.0, abs=1e-9)


def test_specialist_run_sees_only_its_meta_category(synth_shards, tmp_path):
    types = synth_shards.meta_categories("type")
    chosen = max(set(types), key=types.count)
    config, storage, final = _run(synth_shards, tmp_path, "spec", [f"data.meta_category=type={chosen}"], epochs=1)
    checkpoint = load_checkpoint(storage.local_path(checkpoint_dir(1)) / CHECKPOINT)
    assert checkpoint["class_subset"] == [i for i, t in enumerate(types) if t == chosen]
    assert checkpoint["model_args"]["num_classes"] == types.count(chosen)
    expected = sum(c["counts"]["test"] for c in synth_shards.classes if c["type"] == chosen)
    assert final["val_samples"] == expected
    # the same run folder for all classes: a clear error, not a state-dict size mismatch
    with pytest.raises(ConfigError, match=rf"spec cannot be resumed: its checkpoint has {types.count(chosen)} "
                                          rf"classes, this run's data {len(types)} .*give another run.name"):
        _run(synth_shards, tmp_path, "spec", epochs=2)
    names = [c["name"] for c in checkpoint["classes"]]
    assert resume_mismatch(checkpoint, "resnet34", names) is None
    assert resume_mismatch(checkpoint, "apinet", names) == "its checkpoint holds a resnet34, this run trains apinet"
    assert "1 differ in name or order" in resume_mismatch(checkpoint, "resnet34", [*names[:-1], "other"])


def test_apinet_specialist_and_routed_ensemble(synth_shards, tmp_path):
    from rp2k_dist.evaluation.ensemble_eval import evaluate_ensemble
    from rp2k_dist.evaluation.metrics import accuracy_table
    from rp2k_dist.run_folder import find_checkpoint

    _, general, _ = _run(synth_shards, tmp_path, "general", ["data.holdout=0.2"], epochs=1)
    types = synth_shards.meta_categories("type")
    counts = synth_shards.class_counts("train")
    category = max(set(types), key=lambda t: sum(1 for i, x in enumerate(types) if x == t and counts[i] >= 2))
    _, special, final = _run(synth_shards, tmp_path, "apinet", [
        "model.name=apinet", f"model.weights={find_checkpoint(general.local_path())}", f"data.meta_category=type={category}",
        "data.classes_per_batch=2", "data.images_per_class=2", "model.freeze_backbone_epochs=1"], epochs=2)
    assert final["val_samples"] == sum(c["counts"]["test"] for c in synth_shards.classes if c["type"] == category)
    result = evaluate_ensemble(general.local_path(), [special.local_path()], synth_shards.root, workers=0)
    (row,) = result.table3
    assert row["meta_category"] == category
    # "before" is the general model's own Table 2 row for the category
    general_row = next(r for r in accuracy_table(result.general, synth_shards.classes).by_type if r.group == category)
    assert row["general_top1"] == pytest.approx(general_row.top1)
    saved = json.loads((general.local_path() / "ensemble.json").read_text())
    assert saved["table3"][0]["ensemble_top1"] == pytest.approx(row["ensemble_top1"])
    assert (general.local_path() / "table3.md").read_text().split("Paired differences")[0].count(category) == 1
    # the specialist starts from the general model's fc rows of its classes, and says so
    load = json.loads((special.local_path() / "weights_load.json").read_text())
    assert load["sliced"] == ["fc.weight", "fc.bias"] and sorted(load["new"]) == ["map1.bias", "map1.weight", "map2.bias", "map2.weight"]
    expected = _table3_from_parquet(general.local_path(), category, synth_shards.classes)
    assert {key: row[key] for key in expected} == pytest.approx(expected, nan_ok=True)
    # (e): routed by mass with a threshold chosen on the held-out train images, never on test
    assert saved["threshold_source"].startswith("calibrated on the general run's") and "data.holdout=0.2" in saved["threshold_source"]
    assert saved["mass_thresholds"] == [row["mass_threshold"]] == result.thresholds
    # ... and what the threshold does on those images, to read beside the test's routing
    from rp2k_dist.data.holdout import held_out_per_class

    held = held_out_per_class(synth_shards, 0.2)
    mine = sum(int(held[c["index"]]) for c in synth_shards.classes if c["type"] == category)
    assert re.search(rf"routing \(e\) recall / precision there: {category} ([\d.]+|–) / ([\d.]+|–) "
                     rf"\({mine} of its images\)", saved["threshold_source"]), saved["threshold_source"]
    assert row["mass_recall"] is not None and row["mass_top1"] is not None


def _table3_from_parquet(run_dir, category, classes) -> dict:
    """Table 3's row for ``category``, recomputed from Parquet files alone: (a) and the
    top-1 routing from the general run's own predictions.parquet (written by training),
    (b), (c), (d) from the ensemble's files."""
    import pyarrow.parquet as pq

    def rows(name):
        return {r["key"]: r for r in pq.read_table(run_dir / name).to_pylist()}

    def accuracy(table, k):
        return 100 * sum(r["true_class"] in r["top5_classes"][:k] for r in table.values()) / len(table)

    kind = {c["index"]: c["type"] for c in classes}
    general = rows("predictions.parquet")
    mine = {key: r for key, r in general.items() if r["type"] == category}
    sent = {key for key, r in general.items() if kind[r["top5_classes"][0]] == category}
    row = {"meta_category": category, "samples": len(mine), "routing_recall": 100 * len(sent & set(mine)) / len(mine),
           "routed_in": len(sent - set(mine)),
           "routing_precision": 100 * len(sent & set(mine)) / len(sent) if sent else math.nan}
    ensemble, by_mass = rows("ensemble_predictions.parquet"), rows("ensemble_mass_predictions.parquet")
    parts = {"general": mine, "ensemble": {key: ensemble[key] for key in mine}, "mass": {key: by_mass[key] for key in mine},
             "restricted": rows(f"ensemble_{category}_restricted.parquet"),
             "specialist": rows(f"ensemble_{category}_specialist.parquet")}
    for name, table in parts.items():
        assert set(table) == set(mine), name
        for k in (1, 5):
            row[f"{name}_top{k}"] = accuracy(table, k)
    # (b) is the general model's argmax over the category's classes, wherever its top-5 shows it
    for key, r in parts["restricted"].items():
        first_inside = next((c for c in general[key]["top5_classes"] if kind[c] == category), None)
        assert first_inside in (None, r["top5_classes"][0])
    return row


def test_device_decode_path_trains_and_evaluates_everything(synth_shards, tmp_path):
    _, storage, final = _run(synth_shards, tmp_path, "device", ["data.decode=device"], epochs=1)
    assert final["val_samples"] == synth_shards.num_samples("test")
    assert final["train_images"] > 0 and final["train_skipped"] == 0
