"""``rp2k reproduce``: the graph, its plan, the inputs it checks, and a whole reproduction
on a real local Ray cluster whose driver is killed half-way and started again."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rp2k_dist import run_folder
from rp2k_dist.launch import reproduce as rep
from rp2k_dist.launch.reproduce import plan
from rp2k_dist.launch.preflight import PreflightError
from rp2k_dist.errors import ConfigError

VENV_BIN = Path(sys.executable).parent


def test_a_part_brings_the_runs_it_needs():
    assert [e.name for e in rep.select(["table3"])] == [rep.GENERAL, "table3-apinet-liquor", "table3-apinet-cosmetics"]
    assert [e.name for e in rep.select(["table4"])] == [rep.GENERAL, "table4-scratch-aug", "table4-transfer",
                                                       "table4-transfer-aug"]
    assert len(rep.select(None)) == len(rep.PAPER) == 8  # Table 4's first row is Table 2's ResNet-34
    assert [e.name for e in rep.select(["table3-apinet-cosmetics", "cbl"])] == [
        rep.GENERAL, "table3-apinet-cosmetics", "cbl-off"]
    with pytest.raises(ConfigError, match="unknown part.*table9"):
        rep.select(["table9"])


def test_a_failed_run_is_summed_up_by_its_own_error():
    class TaskError(Exception):  # as Ray's RayTaskError: its own text, and the task's exception as .cause
        pass

    workers = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nValueError: loss is nan at epoch 0 step 5\n")
    wrapped = TaskError("\x1b[36mray::_train_task()\x1b[39m (pid=1, ip=127.0.0.1)")
    wrapped.cause = workers
    assert rep.error_line(wrapped) == "RuntimeError: ValueError: loss is nan at epoch 0 step 5"
    assert rep.error_line(KeyError("table2-resnet34")) == "KeyError: 'table2-resnet34'"


def test_sets_apply_to_every_run_or_to_one_part_or_run():
    names = [e.name for e in rep.select(None)]
    sets = rep.split_sets(["optim.epochs=2", "table3:optim.epochs=5", "cbl-off:loss.cbl_beta=0.5"], names)
    assert sets[rep.GENERAL] == ["optim.epochs=2"]
    assert sets["table3-apinet-liquor"] == ["optim.epochs=2", "optim.epochs=5"]
    assert sets["cbl-off"] == ["optim.epochs=2", "loss.cbl_beta=0.5"]
    configs = rep.build_configs(rep.select(None), "shards/x", "runs/x", ["optim.epochs=2", "table3:optim.epochs=5"])
    assert configs["table3-apinet-cosmetics"].optim.epochs == 5 and configs["table2-inception-v3"].optim.epochs == 2
    assert configs["table3-apinet-liquor"].model.weights == ""  # filled in once the general model exists
    assert configs["table3-apinet-liquor"].data.meta_category == "type=liquor"
    with pytest.raises(ConfigError, match="neither a part"):
        rep.split_sets(["table7:optim.lr=1"], names)


def _planned(name, gpus, hours, needs=None):
    return plan.PlannedRun(name, "resnet34", 1, int(hours * 3600 * gpus), 0, 0, gpus, 1.0, needs)


def test_schedule_starts_runs_when_inputs_exist_and_gpus_are_free():
    planned = [_planned("general", 4, 2.0), _planned("other", 4, 1.0), _planned("third", 4, 1.0),
               _planned("specialist", 4, 0.5, needs="general")]
    times = {name: (start / 3600, end / 3600) for name, (start, end) in plan.simulate(planned, gpus=8).items()}
    assert times == {"general": (0, 2), "other": (0, 1), "third": (1, 2), "specialist": (2, 2.5)}
    for t in (0.5, 1.5, 2.2):  # never more GPUs than the plan has
        assert sum(4 for s, e in times.values() if s <= t < e) <= 8
    with pytest.raises(ConfigError, match="needs 16 GPUs"):
        plan.simulate([_planned("big", 16, 1.0)], gpus=8)


def test_plan_for_real_rp2k_on_8_gpus_from_given_img_per_s():
    text = plan.plan(None, None, [], 8, {"resnet34": 3000.0, "inception_v3": 1000.0, "apinet": 2500.0})
    # Table 2 ResNet-34: 30 epochs x 344,854 train images + 30 evaluations x 39,457 test images at 3x
    expected = (30 * 344_854 + 30 * 39_457 / plan.EVAL_SPEEDUP) / 3000.0 / 3600
    line = next(line for line in text.splitlines() if line.startswith(rep.GENERAL))
    assert line.split()[-3] == f"{expected:.1f}" and "30 x 344,854" in line
    liquor = next(line for line in text.splitlines() if line.startswith("table3-apinet-liquor"))
    assert "100 x 16,753" in liquor and float(liquor.split()[-2]) == pytest.approx(expected / 4, abs=0.06)
    total = float(text.split("total ")[1].split()[0])
    rows = [float(line.split()[-3]) for line in text.splitlines() if line.startswith(("table", "cbl"))]
    assert len(rows) == 8 and total == pytest.approx(sum(rows), abs=0.05 * len(rows))  # rows rounded to 0.1
    assert "on 8 GPUs" in text and "assumed" not in text


def test_missing_inputs_are_named_per_run_before_anything_runs(synth_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ImageNet weights there
    monkeypatch.setenv("RP2K_OFFLINE", "1")  # and none may be downloaded
    experiments = rep.select(None)
    configs = rep.build_configs(experiments, str(synth_shards.root), str(tmp_path / "runs"),
                                ["run.use_gpu=false", "run.workers=1", "data.batch_size=8"])
    with pytest.raises(PreflightError) as raised:
        rep.check_inputs(experiments, configs, None)
    lines = raised.value.problems
    weights = [line for line in lines if "model.pretrained" in line]
    assert sorted(line.split(" ")[0] for line in weights) == ["table4-transfer", "table4-transfer-aug"]
    assert all(str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth") in line for line in weights)
    # the synthetic set's cosmetics have too few classes with two images for 30 x 4 batches
    assert any(line.startswith("table3-apinet-cosmetics") and "data.classes_per_batch" in line for line in lines)
    assert not any(line.startswith((rep.GENERAL, "table2-inception-v3", "cbl-off")) for line in lines)


def test_a_run_is_finished_once_its_last_epoch_is_evaluated_and_checkpointed(tmp_path):
    from rp2k_dist.config import load_config
    from rp2k_dist.run_folder import CHECKPOINT, EVALUATION, checkpoint_dir

    config = load_config(None, [f"run.storage_path={tmp_path}", "run.name=general", "optim.epochs=2"])
    run = tmp_path / "general"
    run.mkdir()
    assert not rep.is_finished(config)
    (run / EVALUATION).write_text(json.dumps({"final": {"epoch": 1}}))
    (run / checkpoint_dir(1)).mkdir()
    (run / checkpoint_dir(1) / CHECKPOINT).write_bytes(b"x")
    assert not rep.is_finished(config)  # an earlier epoch
    (run / EVALUATION).write_text(json.dumps({"final": {"epoch": 2}}))
    assert not rep.is_finished(config)  # stopped after its evaluation, before its checkpoint
    (run / checkpoint_dir(2)).mkdir()
    (run / checkpoint_dir(2) / CHECKPOINT).write_bytes(b"x")
    assert rep.is_finished(config)


# --------------------------------------------------------------------------- on a Ray cluster


@pytest.fixture(scope="module")
def paper_shards(tmp_path_factory):
    """A synthetic set where liquor and cosmetics each have 3+ classes with 2+ train images."""
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k

    base = tmp_path_factory.mktemp("reproduce")
    summary = make_synthetic_rp2k(base / "rp2k", SynthConfig(classes=32, images_per_class=12, image_size=64, workers=1))
    manifest = pack_dataset(scan_rp2k(summary.root, summary.metadata_path), base / "shards",
                            PackConfig(shorter_side=48, samples_per_shard=32, workers=1))
    for category in ("liquor", "cosmetics"):
        counts = manifest.class_counts("train")
        assert sum(counts[c] >= 2 for c in manifest.classes_of("type", category)) >= 2
    return manifest


#: The paper's runs at a size two CPU cores train in seconds (1 epoch, tiny crops, P x K 2 x 2).
TINY = [
    "data.batch_size=16", "data.loader_workers=0", "data.shuffle_buffer=64", "data.max_corrupt_fraction=0.2",
    "model.crop_size=32", "model.channels_last=false", "optim.epochs=1", "optim.warmup_epochs=0",
    "augment.border_max=4", "augment.crop_max=3", "run.workers=1", "run.use_gpu=false", "run.cpus_per_worker=2",
    "table3:data.classes_per_batch=2", "table3:data.images_per_class=2",
    "table3:model.freeze_backbone_epochs=0",
]


#: One run of each kind the report shows: the general model, a specialist (Table 3), a
#: Table 4 variant, the CBL ablation, and Fig. 3 (a step, no run); not InceptionV3, whose
#: smallest crop (299 px, its auxiliary head) costs minutes on CPU.
RUNS = [rep.GENERAL, "table3-apinet-liquor", "table4-transfer", "cbl-off"]
ONLY = ",".join([*RUNS, "fig3"])


def _state(runs: Path) -> dict:
    path = runs / run_folder.REPRODUCE_STATE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # caught mid-write
        return {}


@pytest.mark.slow
def test_reproduce_runs_the_graph_survives_a_killed_driver_and_reports_every_table(ray_head, paper_shards, tmp_path):
    from rp2k_dist.analysis.run import table_from_dict
    from rp2k_dist.evaluation.table3_text import table3_markdown
    from rp2k_dist.evaluation.metrics import PAPER_TABLE2, format_percent

    runs = tmp_path / "runs"
    command = [str(VENV_BIN / "rp2k"), "reproduce", "--shards", str(paper_shards.root), "--storage-path", str(runs),
               "--address", ray_head["address"], "--umap-samples", "0", "--only", ONLY] + [w for s in TINY for w in ("--set", s)]
    env = ray_head["env"]

    # First attempt: killed (SIGKILL, no clean-up) once one run has finished and others train.
    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and driver.poll() is None:
            states = [r["state"] for r in _state(runs).get("runs", [])]
            if "finished" in states and "running" in states:
                break
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    before = {r["name"]: r for r in _state(runs)["runs"]}
    done_before = [n for n, r in before.items() if r["state"] == "finished"]
    kept = {n: (runs / n / "metrics.jsonl").read_bytes() for n in done_before}
    folders = {n: sorted(p.name for p in (runs / n).iterdir() if p.name.startswith("epoch_")) for n in done_before}

    # The same command again finishes the rest without training the finished runs again.
    again = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-2000:]
    state = _state(runs)
    records = {r["name"]: r for r in state["runs"]}
    assert sorted(records) == sorted(RUNS)
    assert all(r["state"] == "finished" for r in records.values()), records
    for name in done_before:
        assert records[name]["note"].startswith("finished before this command")
        assert (runs / name / "metrics.jsonl").read_bytes() == kept[name]  # not trained again
        assert sorted(p.name for p in (runs / name).iterdir() if p.name.startswith("epoch_")) == folders[name]
        assert f"start {name} " not in again.stdout and f"resume {name} " not in again.stdout

    # Runs overlapped in time (4 CPUs, 2 per run), and the specialists waited for their input.
    spans = sorted((r["started"], r["finished"]) for r in records.values())
    assert any(spans[i][1] > spans[i + 1][0] for i in range(len(spans) - 1)), spans
    general = records[rep.GENERAL]
    checkpoint = next(iter(sorted((runs / rep.GENERAL).glob("epoch_*/checkpoint.pt"))))
    for name in [n for n in RUNS if n in rep.SPECIALISTS]:
        assert records[name]["started"] >= general["finished"]
        config = (runs / name / "config.yaml").read_text()
        assert f"weights: {checkpoint}" in config

    # The report holds Tables 2, 3, 4 with each run's own numbers.
    report = (runs / f"{run_folder.REPRODUCE}.md").read_text()
    evaluation = json.loads((runs / rep.GENERAL / "evaluation.json").read_text())
    table2 = report.split("## Table 2")[1].split("\n## ")[0]
    assert table_from_dict(evaluation["table2"]).to_markdown(PAPER_TABLE2["resnet34"]) in table2
    average = evaluation["table2"]["overall"]
    assert math.isclose(average["top1"], evaluation["final"]["val_top1"])
    assert (f"| {format_percent(average['top1'])} | [{average['top1_low']:.1f}, {average['top1_high']:.1f}] | "
            f"{format_percent(average['top5'])} |") in table2
    ensemble = json.loads((runs / rep.GENERAL / "ensemble.json").read_text())
    assert [row["meta_category"] for row in ensemble["table3"]] == ["liquor"]
    assert table3_markdown(ensemble["table3"]) in report
    table4 = report.split("## Table 4")[1].split("\n## ")[0]
    for name in [n for n in rep.TABLE4 if n in RUNS]:
        top1 = json.loads((runs / name / "evaluation.json").read_text())["final"]["val_top1"]
        row = next(line for line in table4.splitlines() if line.startswith(f"| {name} "))
        assert f"| {format_percent(top1)} |" in row
    ablation = report.split("## Class-Balanced Loss ablation")[1].split("\n## ")[0]
    off = json.loads((runs / "cbl-off" / "evaluation.json").read_text())["final"]
    row = next(line for line in ablation.splitlines() if line.startswith("| cbl-off "))
    assert row.startswith(f"| cbl-off | 0 | {format_percent(off['val_top1'])} |"), row
    assert (runs / rep.GENERAL / "umap.png").stat().st_size > 10_000 and "![UMAP]" in report
    hours = sum((r["finished"] - r["started"]) / 3600 * 2 for r in records.values())  # 2 CPUs per run
    assert f"Cost spent: {hours:.2f} CPU-hours" in report and state["steps"]["evaluate"]["state"] == "finished"


@pytest.mark.slow
def test_reproduce_seeds_reproduces_once_per_seed_and_reports_mean_and_std(ray_head, paper_shards, tmp_path):
    from rp2k_dist.evaluation.stats import format_mean_std
    from rp2k_dist.launch.reproduce.seeds import SEEDS_REPORT

    runs = tmp_path / "runs"
    command = [str(VENV_BIN / "rp2k"), "reproduce", "--shards", str(paper_shards.root), "--storage-path", str(runs),
               "--address", ray_head["address"], "--only", rep.GENERAL, "--seeds", "2",
               "--report-dir", str(tmp_path / "report")] + [w for s in TINY for w in ("--set", s)]
    done = subprocess.run(command, env=ray_head["env"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    finals = []
    for seed in (0, 1):
        folder = runs / f"seed-{seed}" / rep.GENERAL
        assert yaml.safe_load((folder / "config.yaml").read_text())["run"]["seed"] == seed
        assert (runs / f"seed-{seed}" / f"{run_folder.REPRODUCE}.md").exists()
        finals.append(json.loads((folder / "evaluation.json").read_text())["final"])
    assert finals[0]["val_top1"] != finals[1]["val_top1"] or finals[0]["train_loss"] != finals[1]["train_loss"]
    summary = (runs / SEEDS_REPORT).read_text()
    top1 = [f["val_top1"] for f in finals]
    assert (f"| {rep.GENERAL} | test top-1 | {top1[0]:.2f} | {top1[1]:.2f} | {format_mean_std(top1)} |") in summary
    assert f"| test top-1 | {top1[0]:.1f} | {top1[1]:.1f} |" in summary  # the general run's headline table
    assert (tmp_path / "report" / SEEDS_REPORT).read_text() == summary
    assert (tmp_path / "report" / "seed-1" / f"{run_folder.REPRODUCE}.md").exists()
