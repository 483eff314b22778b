"""`rp2k demo --size tiny` runs the whole pipeline end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_tiny_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "rp2k_dist.cli", "demo", "--size", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| average (micro) |" in done.stdout
    run = out / "runs" / "demo-resnet34"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert history[-1]["world_size"] == 2
    manifest = json.loads((out / "shards" / "dataset.json").read_text())
    assert history[-1]["val_samples"] == manifest["splits"]["test"]["samples"]
    assert len(manifest["skipped"]) == 1  # the planted corrupt file, counted, not fatal
    assert (run / "predictions.parquet").exists()
    assert (run / "umap.png").exists() and (run / "report" / "report.html").exists()
    assert "report: " in done.stdout
