"""`rp2k demo --size tiny` runs the whole pipeline end to end, from a non-editable install.

The package is built as a wheel and installed with ``pip install --no-deps --target`` (the
dependencies come from this environment), then ``rp2k demo`` runs from a folder outside
the repository: the presets it needs must come from inside the installed package.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rp2k_dist.data.holdout import held_out_classes

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def install_wheel(tmp_path: Path) -> Path:
    """Build the wheel from a copy of the sources (no build/ left in the repo); install it
    into a folder of its own. Returns that folder (for PYTHONPATH; scripts in bin/)."""
    source = tmp_path / "source"
    for name in ("rp2k_dist", "jobs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "wheel"), str(source)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("rp2k_dist-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True,
                   timeout=300)
    return site


def test_tiny_demo_runs_end_to_end_from_an_installed_wheel(tmp_path):
    site = install_wheel(tmp_path)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import rp2k_dist; from rp2k_dist.config import resolve_preset; "
         "print(rp2k_dist.__file__); print(resolve_preset('table2_resnet34'))"],
        cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert Path(where[0]).is_relative_to(site)  # the installed copy, not the repository
    assert Path(where[1]) == site / "rp2k_dist" / "presets" / "table2_resnet34.yaml"

    done = subprocess.run([str(site / "bin" / "rp2k"), "demo", "--size", "tiny"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = cwd / "runs" / "demo"  # the default --out, relative to where rp2k runs
    assert "| average (micro) |" in done.stdout
    run = out / "runs" / "demo-resnet34"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["world_size"] == 2
    manifest = json.loads((out / "shards" / "dataset.json").read_text())
    unseen = held_out_classes(manifest["classes"], 1)  # the tiny demo's data.holdout_classes
    unseen_test = sum(manifest["classes"][c]["counts"]["test"] for c in unseen)
    assert len(unseen) == 1 and unseen_test > 0
    assert history[-1]["val_samples"] == manifest["splits"]["test"]["samples"] - unseen_test  # seen classes only
    assert "open set: 1 class never trained on" in done.stdout and (run / "openset.md").exists()
    assert len(manifest["skipped"]) == 1  # the planted corrupt file, counted, not fatal
    assert (run / "predictions.parquet").exists()
    assert (run / "umap.png").exists() and (run / "report" / "report.html").exists()
    assert "report: " in done.stdout


def test_the_training_line_says_what_this_call_trained():
    from rp2k_dist.demo import training_line

    final = {"epoch": 12, "images_per_second": 41.6}
    assert training_line(0, final, 95.2) == "trained 12 of 12 epochs in 95 s (42 img/s in the last epoch)"
    assert training_line(5, final, 40) == "trained 7 of 12 epochs in 40 s, resumed after epoch 5 (42 img/s in the last epoch)"
    assert training_line(12, final, 9) == "the run had finished its 12 epochs before: nothing to train (remove its folder to retrain)"
