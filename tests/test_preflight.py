"""Pre-flight: a bad config fails in the driver, in seconds, before Ray starts."""

from __future__ import annotations

import ray
import pytest

from rp2k_dist.cli import main
from rp2k_dist.config import load_config
from rp2k_dist.engine.run_data import select_data
from rp2k_dist.launch.preflight import PreflightError, local_resources, preflight
from tests.conftest import tiny_run_overrides


def _train(capsys, shards, tmp_path, *extra: str) -> tuple[int, list[str]]:
    """``rp2k train`` in this process; (exit code, stderr lines)."""
    sets = [a for o in tiny_run_overrides(shards, tmp_path / "runs", "pre") for a in ("--set", o)]
    code = main(["train", "jobs/smoke.yaml", *sets, *[a for o in extra for a in ("--set", o)]])
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_failed_before_ray(code, lines, tmp_path, key: str) -> str:
    assert code == 2
    assert len(lines) == 2 and lines[1].startswith("  hint: "), lines  # the error, then what to do
    assert f"error: {key}" in lines[0]
    assert not ray.is_initialized()  # no Ray, so no Ray worker
    assert not (tmp_path / "runs" / "pre").exists()  # and no run folder
    return lines[0]


@pytest.fixture(autouse=True)
def _no_ray(no_ray):
    """Every test here starts without Ray in this process (tests.conftest.no_ray)."""


def test_missing_shards_folder_fails_in_the_driver(capsys, tmp_path):
    code, lines = _train(capsys, tmp_path / "nowhere", tmp_path)
    line = _assert_failed_before_ray(code, lines, tmp_path, "data.shards")
    assert "rp2k pack" in line  # the fix


def test_meta_category_no_class_has_lists_the_values_present(capsys, synth_shards, tmp_path):
    code, lines = _train(capsys, synth_shards.root, tmp_path, "data.meta_category=type=packages")
    line = _assert_failed_before_ray(code, lines, tmp_path, "data.meta_category")
    present = sorted({c["type"] for c in synth_shards.classes})
    assert f"present: {', '.join(present)}" in line


def test_meta_category_in_another_case_selects_the_same_classes(synth_shards, tmp_path):
    stored = synth_shards.classes[0]["type"]
    runs = {}
    for spelling in (stored, stored.upper(), f" {stored.title()}"):
        config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "case")
                             + [f"data.meta_category=type={spelling}"])
        preflight(config, local_resources())
        runs[spelling] = [c["global_index"] for c in select_data(config).classes]
    expected = [c["index"] for c in synth_shards.classes if c["type"] == stored]
    assert expected and all(found == expected for found in runs.values())


def test_missing_weights_file_fails_in_the_driver(capsys, synth_shards, tmp_path):
    code, lines = _train(capsys, synth_shards.root, tmp_path, f"model.weights={tmp_path / 'w.pt'}")
    assert "w.pt not found" in _assert_failed_before_ray(code, lines, tmp_path, "model.weights")


def test_weights_that_do_not_fit_the_model_fail_in_the_driver(synth_shards, tmp_path):
    import torch

    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "w.pt")
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "fit") + [f"model.weights={tmp_path / 'w.pt'}"])
    with pytest.raises(PreflightError, match="model.weights: .* does not fit resnet34"):
        preflight(config, local_resources())


def test_more_gpus_than_the_cluster_has_fails_in_the_driver(capsys, synth_shards, tmp_path):
    gpus = int(local_resources()["GPU"])
    code, lines = _train(capsys, synth_shards.root, tmp_path, "run.use_gpu=true", f"run.workers={gpus + 1}",
                         "run.cpus_per_worker=0")
    line = _assert_failed_before_ray(code, lines, tmp_path, "run.workers x run.gpus_per_worker")
    assert f"= {gpus + 1} GPUs, the cluster has {gpus}" in line


def test_more_cpus_than_the_cluster_has_is_named(synth_shards, tmp_path):
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "cpu") + ["run.workers=3"])
    with pytest.raises(PreflightError, match=r"run.workers x run.cpus_per_worker: 3 x 1 = 3 CPUs, the cluster has 2"):
        preflight(config, {"CPU": 2.0})


def test_a_crop_too_small_for_the_model_fails_in_the_driver(capsys, synth_shards, tmp_path):
    code, lines = _train(capsys, synth_shards.root, tmp_path, "model.name=inception_v3", "model.crop_size=80")
    line = _assert_failed_before_ray(code, lines, tmp_path, "model.crop_size")
    assert "inception_v3 cannot train on 80px crops (minimum 299)" in line


def test_infeasible_p_x_k_names_the_classes_that_can_pair(synth_shards, tmp_path):
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "pk")
                         + ["data.classes_per_batch=100", "data.images_per_class=2"])
    pairable = sum(n >= 2 for n in synth_shards.class_counts("train"))
    with pytest.raises(PreflightError, match=f"data.classes_per_batch <= {pairable}"):
        preflight(config, local_resources())


def test_unwritable_storage_and_every_problem_at_once(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, lines = _train(capsys, tmp_path / "nowhere", tmp_path, f"run.storage_path={tmp_path / 'file' / 'runs'}")
    assert code == 2
    assert len(lines) == 3 and "error: data.shards:" in lines[0] and lines[1].startswith("  run.storage_path: cannot write")
    assert lines[2].startswith("  hint: ")
    assert not ray.is_initialized()


def test_a_batch_larger_than_a_workers_share_is_named(synth_shards, tmp_path):
    config = load_config(None, tiny_run_overrides(synth_shards.root, tmp_path, "big") + ["data.batch_size=1000"])
    with pytest.raises(PreflightError, match=r"data.batch_size: batches of 1000 images, but each of the 1 workers"):
        preflight(config, local_resources())
