"""The demo's figures over seeds (``rp2k demo --seeds N``): each seed's value, mean ± std,
and the ensemble's gain over the seeds, on run folders written here with known numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rp2k_dist import run_folder
from rp2k_dist.analysis.seed_summary import headline, pooled_gains, summary_markdown
from rp2k_dist.evaluation.stats import paired_difference_over_seeds

CLASSES = np.repeat(np.arange(4), 10)  # 40 cosmetics test images of 4 classes
KEYS = [f"img{i:02d}" for i in range(40)]


def _predictions(path: Path, correct: np.ndarray) -> None:
    pd.DataFrame({"key": KEYS, "true_class": CLASSES, "type": "cosmetics", "correct_top1": correct}).to_parquet(path)


def fake_run(folder: Path, top1: float, general: np.ndarray, routed: np.ndarray, auroc: float | None) -> Path:
    folder.mkdir(parents=True)
    (folder / run_folder.EVALUATION).write_text(json.dumps({
        "final": {"val_top1": top1, "val_top5": 90.0, "val_macro_top1": top1 - 1},
        "table2": {"by_type": [{"group": "cosmetics", "top1": 100 * general.mean()}]}}))
    (folder / run_folder.ENSEMBLE).write_text(json.dumps({"table3": [{
        "meta_category": "cosmetics", "general_top1": 100 * general.mean(), "ensemble_top1": 100 * routed.mean(),
        "differences": {"(d)-(a)": {"estimate": 100 * (routed.mean() - general.mean())}}}]}))
    (folder / run_folder.OPENSET).write_text(json.dumps({"rows": [{"group": "all", "auroc": auroc, "far": None}]}))
    _predictions(folder / "ensemble_general_predictions.parquet", general)
    _predictions(folder / "ensemble_predictions.parquet", routed)
    return folder


def test_the_summary_gives_each_seed_its_mean_and_std_and_the_gain_over_seeds(tmp_path):
    rng = np.random.default_rng(0)
    general = rng.random((3, 40)) < 0.5
    routed = general | (rng.random((3, 40)) < 0.4)  # the ensemble fixes images, never breaks one
    runs = [fake_run(tmp_path / f"s{s}", top1, general[s], routed[s], auroc)
            for s, (top1, auroc) in enumerate([(40.0, 0.6), (44.0, 0.7), (48.0, None)])]
    assert headline(runs[0])["test top-1"] == 40.0 and np.isnan(headline(runs[2])["open set AUROC (known vs unseen)"])
    text = summary_markdown(runs, [0, 1, 2])
    assert "| test top-1 | 40.0 | 44.0 | 48.0 | 44.0 ± 4.0 (3 seeds) |" in text
    assert "| open set AUROC (known vs unseen) | 0.600 | 0.700 | – | 0.650 ± 0.071 (2 seeds) |" in text
    gain = pooled_gains(runs)[("cosmetics", "(d)-(a)")]
    assert gain == paired_difference_over_seeds(routed, general, CLASSES)
    assert gain.estimate == pytest.approx(100 * (routed.mean() - general.mean())) and gain.low > 0
    each = [100 * (routed[s].mean() - general[s].mean()) for s in range(3)]  # Table 3's own, per seed
    assert (f"| cosmetics | (d)-(a) | 40 | {gain.format()} | {', '.join(f'{v:+.1f}' for v in each)} | "
            f"{np.mean(each):.1f} ± {np.std(each, ddof=1):.1f} (3 seeds) | helped: ") in text
    assert ("cosmetics", "(e)-(a)") not in pooled_gains(runs)  # no mass-routed predictions written


def test_runs_without_the_ensemble_give_the_table_alone(tmp_path):
    run = fake_run(tmp_path / "s0", 40.0, np.ones(40, bool), np.ones(40, bool), 0.5)
    (run / "ensemble_general_predictions.parquet").unlink()
    assert pooled_gains([run]) == {}
    assert "Ensemble gain" not in summary_markdown([run])


def test_rp2k_demo_seeds_runs_each_seed_in_its_folder_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    from rp2k_dist import demo
    from rp2k_dist.cli import main

    ran = []

    def one_demo(out: Path, size: str, address: str | None, seed: int) -> int:  # the pipeline's outputs, made up
        ran.append((out, size, seed))
        fake_run(out / "runs" / "demo-resnet34", 40.0 + seed, np.zeros(40, bool), np.ones(40, bool), 0.5)
        return 0

    monkeypatch.setattr(demo, "run_demo", one_demo)
    assert main(["demo", "--out", str(tmp_path), "--size", "tiny", "--seed", "3", "--seeds", "2"]) == 0
    assert ran == [(tmp_path / "seed-3", "tiny", 3), (tmp_path / "seed-4", "tiny", 4)]
    summary = (tmp_path / "seeds.md").read_text()
    assert "| test top-1 | 43.0 | 44.0 | 43.5 ± 0.7 (2 seeds) |" in summary and "| seed 3 | seed 4 |" in summary
    assert summary.split("\n", 2)[2] in capsys.readouterr().out


def test_the_summary_reads_seed_runs_from_a_bucket_as_from_disk(tmp_path, s3_endpoint):
    from rp2k_dist import storage

    rng = np.random.default_rng(1)
    general, routed = rng.random((2, 40)) < 0.5, rng.random((2, 40)) < 0.7
    local = [fake_run(tmp_path / f"s{s}", 40.0 + s, general[s], routed[s], 0.6) for s in range(2)]
    remote = [f"s3://{s3_endpoint.bucket}/seed-summary/s{s}" for s in range(2)]
    for folder, uri in zip(local, remote):
        for name in storage.walk(folder):
            storage.write_bytes(storage.join(uri, name), (folder / name).read_bytes())
    assert summary_markdown(remote) == summary_markdown(local)
    assert "Ensemble gain" in summary_markdown(remote)
