"""The run folder: one checkpoint layout for local and Ray runs, the old local layout still
read, and each artefact written and read back through rp2k_dist.run_folder."""

from __future__ import annotations

import pytest
import torch

from rp2k_dist.engine.context import LocalContext
from rp2k_dist.input_spec import InputSpec
from rp2k_dist.run_folder import (
    CHECKPOINT,
    FORMAT,
    VERSION,
    CheckpointError,
    checkpoint_dir,
    checkpoint_dirs,
    find_checkpoint,
    find_run_dir,
    load_checkpoint,
    read_metrics,
    to_bytes,
    write_metrics,
)
from rp2k_dist.storage import RunStorage


def _checkpoint(epoch: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "epoch": epoch, "model": {"w": torch.full((2,), float(epoch))}}


def test_local_runs_write_the_ray_layout_and_keep_the_newest(tmp_path):
    storage = RunStorage(str(tmp_path), "run")
    context = LocalContext(storage, device="cpu", keep=2)
    for epoch in (1, 2, 3):
        context.report({"epoch": epoch}, _checkpoint(epoch))
    assert checkpoint_dirs(storage) == [checkpoint_dir(2), checkpoint_dir(3)] == ["epoch_0002", "epoch_0003"]
    assert (tmp_path / "run" / "epoch_0003" / CHECKPOINT).is_file()
    assert context.latest_checkpoint()["epoch"] == 3
    assert find_checkpoint(tmp_path / "run") == str(tmp_path / "run" / "epoch_0003" / CHECKPOINT)


def test_one_layout_checkpoints_sit_directly_in_the_run_folder(tmp_path):
    """Mid-epoch folders sort between the epochs around them; a folder of another layout
    (``checkpoints/epoch_NNNN``) holds no checkpoint of the run."""
    storage = RunStorage(str(tmp_path), "one")
    context = LocalContext(storage, device="cpu", keep=10)
    context.report({"epoch": 1}, _checkpoint(1))
    mid = {**_checkpoint(1), "epoch_state": {"global_step": 17}}
    context.report({"epoch": 1}, mid)
    assert checkpoint_dirs(storage) == ["epoch_0001", "epoch_0001_step_0000017"]
    run = tmp_path / "one"
    for inner in (run / "epoch_0001_step_0000017" / CHECKPOINT, run / "epoch_0001", run):
        assert find_run_dir(inner) == str(run)
    other = RunStorage(str(tmp_path), "other")
    other.write_bytes(f"checkpoints/{checkpoint_dir(2)}/{CHECKPOINT}", to_bytes(_checkpoint(2)))
    assert checkpoint_dirs(other) == []
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        find_checkpoint(tmp_path / "other")


def test_a_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an rp2k-dist checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        find_checkpoint(tmp_path)


def test_metrics_round_trip_and_a_missing_history_is_empty(tmp_path):
    storage = RunStorage(str(tmp_path), "m")
    assert read_metrics(storage) == []
    history = [{"epoch": 1, "val_top1": 12.5}, {"epoch": 2, "val_top1": 30.0, "note": "青岛"}]
    write_metrics(storage, history)
    assert read_metrics(storage) == history


def test_input_spec_round_trips_through_its_checkpoint_form():
    spec = InputSpec(299, 342, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    data = spec.to_dict()
    assert data == {"crop_size": 299, "resize_size": 342, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert InputSpec.from_dict(data) == spec
