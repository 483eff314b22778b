"""Ray Tune sweeps on the shared local Ray cluster: ASHA stops weak trials and frees their
CPUs while a failing trial is recorded and the sweep goes on, a killed sweep driver resumes
without rerunning finished trials, and the best trial is exported as a preset that trains."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pandas as pd
import pytest
import ray

from rp2k_dist.config import ConfigError, SweepConfig, is_sweep_preset, load_config
from rp2k_dist.launch.trainer import read_metrics, run_training
from rp2k_dist.launch.search_space import check_search_space, is_grid, load_search_space, parse_search_space
from rp2k_dist.launch.tuner import TRIAL_RECORD, load_sweep, run_sweep
from tests.conftest import tiny_run_overrides
from tests.ray_clusters import SHARED_CPUS

pytestmark = pytest.mark.slow

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CPUS = SHARED_CPUS  # the shared cluster's


def _overrides(shards, storage, name: str, epochs: int) -> list[str]:
    return tiny_run_overrides(shards.root, storage, name, epochs) + ["run.max_failures=0"]


def _wait_for_all_cpus(timeout_s: float = 60.0) -> float:
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0.0) < CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0.0)


# --------------------------------------------------------------------------- without Ray


def test_sweep_presets_and_the_default_space_check_against_the_config():
    beta = load_sweep(JOBS / "sweep_beta.yaml")
    assert is_sweep_preset(JOBS / "sweep_beta.yaml") and not is_sweep_preset(JOBS / "demo.yaml")
    assert beta.space == {"loss.cbl_beta": {"grid_search": [0.0, 0.9, 0.99, 0.999, 0.9999]}}
    assert (beta.settings.scheduler, beta.settings.samples, beta.config.run.name) == ("none", 1, "sweep-beta")
    assert beta.config.loss.variant == "softmax"  # the rest comes from the extended presets
    augmentation = load_sweep(JOBS / "sweep_augmentation.yaml")
    assert sorted(augmentation.space) == ["augment.border", "augment.brightness", "augment.crop", "augment.perspective"]
    assert is_grid(augmentation.space)
    default = load_sweep(JOBS / "demo.yaml")  # no search_space: -> jobs/search_space.yaml
    assert set(default.space) == set(load_search_space(JOBS / "search_space.yaml"))
    assert not is_grid(default.space)
    for sweep in (beta, augmentation, load_sweep(JOBS / "table2_resnet34.yaml")):
        check_search_space(sweep.config, sweep.space)


@pytest.mark.parametrize("spec, message", [
    ({"optim.lrr": {"choice": [0.1]}}, "unknown key.*optim.lrr"),
    ({"optimizer.lr": {"choice": [0.1]}}, "unknown key.*optimizer"),
    ({"optim.lr": {"normal": [0.1, 0.01]}}, "unknown distribution 'normal'"),
    ({"optim.lr": 0.1}, "must name one distribution"),
    ({"loss.cbl_beta": {"grid_search": [0.99, 1.0]}}, r"loss.cbl_beta=1.0.*\[0, 1\)"),
    ({"augment.brightness_max": {"uniform": [0.1, 1.5]}}, "brightness_max"),
    ({"optim.lr": {"loguniform": [0, 0.1]}}, "low > 0"),
    ({"augment.border_max": {"randint": [10, 5]}}, "low < high"),
    ({"run.name": {"choice": ["a", "b"]}}, "set by the sweep"),
])
def test_a_wrong_search_space_fails_before_any_trial_naming_the_key(spec, message):
    config = load_config(JOBS / "demo.yaml")
    with pytest.raises(ConfigError, match=message):
        check_search_space(config, parse_search_space(spec))


def test_mlflow_without_the_package_is_a_clear_error(tmp_path):
    if find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed")
    config = load_config(JOBS / "demo.yaml", [f"run.storage_path={tmp_path}"])
    with pytest.raises(ConfigError, match="needs the mlflow package"):
        run_sweep(config, parse_search_space({"optim.lr": {"choice": [0.01]}}),
                  SweepConfig(samples=1, scheduler="none", max_concurrent=1), mlflow_uri=f"file:{tmp_path}/mlruns")


# --------------------------------------------------------------------------- sweeps on Ray


def test_asha_stops_a_weak_trial_records_a_failing_one_and_the_best_config_trains(ray_cluster, synth_shards, tmp_path):
    config = load_config(None, _overrides(synth_shards, tmp_path, "asha", epochs=3))
    # Grid order = start order, two at a time: two useful learning rates first; then one whose
    # loss is NaN at once (with run.max_failures=0 the worker's NonFiniteLossError ends the
    # trial's Ray Train run; the sweep records it and goes on) and one that cannot learn,
    # which ASHA compares at epoch 2 (its one rung) against the first two and stops. After one
    # epoch the useful rates are still at chance on this set's 41 test images: no rung there.
    lrs = [0.016, 0.004, 1e30, 1e-7]
    space = parse_search_space({"optim.lr": {"grid_search": lrs}})
    result = run_sweep(config, space, SweepConfig(samples=1, scheduler="asha", max_concurrent=2,
                                                  grace_period=2, reduction_factor=2), address=None)

    # every stopped trial's placement group is gone: all CPUs are free again
    assert _wait_for_all_cpus() == CPUS
    sweep = tmp_path / "asha"
    table = pd.read_parquet(sweep / "trials.parquet")
    assert len(table) == 4 and sorted(table["optim.lr"]) == sorted(lrs)
    assert list(pd.read_csv(sweep / "trials.csv")["trial_id"]) == list(table["trial_id"])
    failed = table[table["status"] == "ERROR"]
    assert list(failed["optim.lr"]) == [1e30] and (failed["epochs"] == 0).all()
    assert "NonFiniteLossError" in failed["error"].iloc[0] or "loss is" in failed["error"].iloc[0]
    stopped = table[table["status"] == "STOPPED"]
    assert 1e-7 in set(stopped["optim.lr"]) and (stopped["epochs"] < 3).all()  # 0.004 may trail 0.016 at the rung too
    finished = table[table["status"] == "TERMINATED"]
    assert len(finished) >= 1 and (finished["epochs"] == 3).all()
    trained = table[table["epochs"] > 0]
    assert trained["best_val_top1"].is_monotonic_decreasing and table.index[-1] == failed.index[0]  # best first
    for row in trained.itertuples():  # the table agrees with each trial's own run
        history = read_metrics(load_config(Path(row.run) / "config.yaml"))
        assert len(history) == row.epochs
        assert max(m["val_top1"] for m in history) == pytest.approx(row.best_val_top1)
    # Tune's own logs stay in the sweep folder (CSV, JSON and TensorBoard loggers)
    assert len(list(sweep.glob("rp2k_trial_*/progress.csv"))) == len(trained)  # from a trial's first result
    assert len(list(sweep.glob("rp2k_trial_*/events.out.tfevents.*"))) == len(table)  # from its start

    best = load_config(sweep / "best.yaml")
    assert best.optim.lr == pytest.approx(table["optim.lr"].iloc[0])
    assert best.run.name == "asha-best" and best.run.eval_every == config.run.eval_every
    assert result.best_config == best
    final = run_training(load_config(sweep / "best.yaml", ["optim.epochs=1"]))
    assert final["epoch"] == 1 and (tmp_path / "asha-best" / "table2.md").exists()


DRIVER = """
import json, sys
from rp2k_dist.config import SweepConfig, load_config
from rp2k_dist.launch.tuner import parse_search_space, run_sweep
args = json.loads(sys.argv[1])
run_sweep(load_config(None, args["overrides"]), parse_search_space(args["space"]),
          SweepConfig(samples=1, scheduler="none", max_concurrent=1), address=args["address"])
"""


def _run_files(run: Path) -> dict[str, int]:
    """Modification times of what a (re)started training run writes."""
    names = ["config.yaml", "metrics.jsonl", "checkpoint_manager_snapshot.json", *(p.name for p in run.glob("epoch_*"))]
    return {name: (run / name).stat().st_mtime_ns for name in names}


def _run_driver(args: dict, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(args)], stdout=out, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])


def test_a_killed_sweep_driver_resumes_without_rerunning_finished_trials(ray_cluster, synth_shards, tmp_path):
    args = {"overrides": _overrides(synth_shards, tmp_path, "resume", epochs=1),
            "space": {"optim.lr": {"grid_search": [0.016, 0.008]}},
            "address": ray.get_runtime_context().gcs_address}  # a second driver (job) on this cluster
    trials = tmp_path / "resume" / "trials"
    log = tmp_path / "driver.log"
    driver = _run_driver(args, log)
    deadline = time.monotonic() + 240
    while not list(trials.glob(f"*/{TRIAL_RECORD}")):  # one trial at a time: the first has ended
        assert driver.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    first = next(trials.glob(f"*/{TRIAL_RECORD}")).parent
    finished = _run_files(first)

    assert _run_driver(args, log).wait(timeout=300) == 0, log.read_text()
    assert "resuming sweep" in log.read_text()
    assert _run_files(first) == finished  # the finished trial was not trained again
    table = pd.read_parquet(tmp_path / "resume" / "trials.parquet")
    assert sorted(table["optim.lr"]) == [0.008, 0.016]
    assert (table["status"] == "TERMINATED").all() and (table["epochs"] == 1).all()
    assert _wait_for_all_cpus() == CPUS
