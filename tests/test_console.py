"""The operator's console: one summary line per epoch, Ray's chatter off by default."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec

import pytest

from rp2k_dist.launch.console import EpochPrinter, format_epoch
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides

LINE = re.compile(r"^epoch +(\d+)/(\d+)  loss (\S+)  train top-1 +(\S+) %  val top-1 +(\S+) %  top-5 +(\S+) %  "
                  r"(\d+) img/s  elapsed (\d+:\d\d:\d\d)  ETA (\d+:\d\d:\d\d)$")


def _row(epoch, **extra):
    return {"epoch": epoch, "train_loss": 2.5 / epoch, "train_top1": 10.0 * epoch, "images_per_second": 812.4,
            **extra}


def test_format_epoch_shows_every_field_and_marks_epochs_without_evaluation():
    line = format_epoch(_row(3, val_top1=40.06, val_top5=70.24), 30, 250.2, 2250)
    assert line == ("epoch  3/30  loss 0.833  train top-1  30.0 %  val top-1  40.1 %  top-5  70.2 %  812 img/s  "
                    "elapsed 0:04:10  ETA 0:37:30")
    assert "val top-1     -" in format_epoch(_row(1), 30, 10, None) and format_epoch(_row(1), 30, 10, None).endswith("ETA -")
    selecting = format_epoch(_row(3, val_top1=40.06, val_top5=70.24, holdout_top1=55.56, selected_epoch=2), 30, 250.2, 2250)
    assert "top-5  70.2 %  holdout top-1  55.6 % (best: epoch 2)  812 img/s" in selecting


def test_epoch_printer_prints_each_new_epoch_once_and_skips_a_resumed_history(tmp_path):
    storage = RunStorage(str(tmp_path), "run")
    write = lambda rows: storage.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))  # noqa: E731
    write([_row(1, val_top1=1.0, val_top5=2.0)])  # from an earlier attempt
    out = io.StringIO()
    printer = EpochPrinter(storage, 4, out=out)
    printer.poll()
    assert out.getvalue() == ""
    write([_row(e, val_top1=1.0, val_top5=2.0, epoch_seconds=100.0) for e in (1, 2)])
    printer.poll()
    write([_row(e, val_top1=1.0, val_top5=2.0, epoch_seconds=100.0) for e in (1, 2, 3)])
    printer.poll()
    printer.poll()
    lines = out.getvalue().splitlines()
    assert [int(LINE.match(line).group(1)) for line in lines] == [2, 3]
    assert LINE.match(lines[0]).group(9) == "0:03:20"  # first summary: 2 epochs left x epoch_seconds
    assert LINE.match(lines[1]).group(9) == "0:00:00"  # then the pace between summaries (polls: ~0 s)


def test_epoch_printer_prints_each_drain_notice_once(tmp_path):
    from rp2k_dist.run_folder import append_preemption

    storage = RunStorage(str(tmp_path), "run")
    event = {"node_ids": ["1e23ac81a7281d4c"], "ranks": [2], "seconds_left": 85.3, "saved": "mid-epoch checkpoint",
             "checkpoint": "epoch_0000_step_0000002", "consumed": 96, "epoch": 1, "saved_before_deadline": True}
    out = io.StringIO()
    printer = EpochPrinter(storage, 4, out=out)
    append_preemption(storage, event)
    printer.poll()
    printer.poll()
    assert out.getvalue() == ("preemption: node 1e23ac81 (ranks [2]) drained, 85 s before its deadline; "
                              "saved epoch_0000_step_0000002 (96 samples of epoch 1) before it\n")
    late = {**event, "seconds_left": None, "saved": "epoch-end checkpoint (after evaluation)", "checkpoint": "epoch_0001"}
    append_preemption(storage, late)
    printer.poll()
    assert out.getvalue().splitlines()[1].endswith("no deadline given; epoch_0001 follows at the end of epoch 1")
    assert EpochPrinter(storage, 4, out=io.StringIO()).preemptions == 2  # a resumed driver does not repeat them


@pytest.mark.slow
def test_rp2k_train_prints_one_line_per_epoch_and_no_ray_report_lines(synth_shards, tmp_path, monkeypatch):
    sets = [a for o in tiny_run_overrides(synth_shards.root, tmp_path, "console", epochs=2) for a in ("--set", o)]
    mlflow = f"file://{tmp_path / 'mlruns'}" if find_spec("mlflow") else None
    done = subprocess.run([sys.executable, "-m", "rp2k_dist.cli", "train", "jobs/smoke.yaml", *sets,
                           *(["--mlflow-uri", mlflow] if mlflow else [])],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_ALLOW_FILE_STORE": "true"}, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    history = [json.loads(line) for line in (tmp_path / "console" / "metrics.jsonl").read_text().splitlines()]
    summaries = [LINE.match(line) for line in done.stdout.splitlines() if line.startswith("epoch ")]
    assert len(summaries) == len(history) == 2 and all(summaries)
    for match, row in zip(summaries, history):
        assert (int(match.group(1)), int(match.group(2))) == (row["epoch"], 2)
        # printed to 3 and 1 decimals: off by at most half the last digit (a tie, such as
        # 18.75 -> 18.8, by exactly that, give or take float rounding)
        assert float(match.group(3)) == pytest.approx(row["train_loss"], abs=5e-4 + 1e-9)
        assert float(match.group(4)) == pytest.approx(row["train_top1"], abs=0.05 + 1e-9)
        assert float(match.group(5)) == pytest.approx(row["val_top1"], abs=0.05 + 1e-9)
        assert float(match.group(6)) == pytest.approx(row["val_top5"], abs=0.05 + 1e-9)
        assert int(match.group(7)) == round(row["images_per_second"])
    assert "Reporting training result" not in output
    assert "PreemptionWatcher" not in output and "Token authentication" not in output
    # Ray Train's lines are still kept, in the run folder
    assert "Reporting training result" in (tmp_path / "console" / "logs" / "rank-0.log").read_text()
    assert f"metrics:     {tmp_path / 'console' / 'metrics.jsonl'}" in done.stdout
    assert (tmp_path / "console" / "tensorboard").is_dir()
    if mlflow:
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        assert _mlflow_history(mlflow, "console", "val_top1") == [(m["epoch"], m["val_top1"]) for m in history]


def _mlflow_history(uri: str, experiment: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return [(m.step, m.value) for m in sorted(client.get_metric_history(runs[0].info.run_id, key), key=lambda m: m.step)]


def test_mlflow_run_logs_each_epoch_and_a_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # a folder as the tracking store
    from rp2k_dist.config import load_config
    from rp2k_dist.launch.tracking import MlflowRun

    uri, config = f"file://{tmp_path / 'mlruns'}", load_config(None, ["run.name=tracked", "optim.lr=0.25"])
    first = MlflowRun(uri, config, str(tmp_path / "tracked"))
    first.log(_row(1, val_top1=5.0))
    first.finish(failed=True)
    again = MlflowRun(uri, config, str(tmp_path / "tracked"))  # the same run folder: the same MLflow run
    again.log(_row(2, val_top1=7.5))
    again.finish(failed=False)
    assert again.run_id == first.run_id
    assert _mlflow_history(uri, "tracked", "val_top1") == [(1, 5.0), (2, 7.5)]
    run = again.client.get_run(again.run_id)
    assert run.data.params["optim.lr"] == "0.25" and run.info.status == "FINISHED"


@pytest.mark.slow
def test_rp2k_train_seeds_trains_one_run_per_seed_and_aggregates_them(synth_shards, tmp_path):
    sets = [a for o in tiny_run_overrides(synth_shards.root, tmp_path, "seeded", epochs=1) for a in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "rp2k_dist.cli", "train", "jobs/smoke.yaml", *sets, "--seeds", "2"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    for seed in (0, 1):
        config = (tmp_path / f"seeded-s{seed}" / "config.yaml").read_text()
        assert f"seed: {seed}\n" in config and (tmp_path / f"seeded-s{seed}" / "evaluation.json").exists()
    assert not (tmp_path / "seeded").exists()
    summary = (tmp_path / "seeded-seeds.md").read_text()
    assert "| seeded-s0 |" in summary and "| seeded-s1 |" in summary
    assert re.search(r"\| \*\*seeded\*\* \(mean ± std\) \|.*\| [\d.]+ ± [\d.]+ \(2 seeds\) \|", summary), summary
    assert "(mean ± std)" in done.stdout
