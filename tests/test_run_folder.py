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


def test_the_old_local_layout_is_still_read_and_resumed(tmp_path):
    storage = RunStorage(str(tmp_path), "old")
    for epoch in (1, 2):
        storage.write_bytes(f"checkpoints/{checkpoint_dir(epoch)}/{CHECKPOINT}", to_bytes(_checkpoint(epoch)))
    run = tmp_path / "old"
    assert find_checkpoint(run) == str(run / "checkpoints" / "epoch_0002" / CHECKPOINT)
    context = LocalContext(storage, device="cpu", keep=2)
    assert context.latest_checkpoint()["epoch"] == 2  # a resume continues the old run
    context.report({"epoch": 3}, _checkpoint(3))  # new checkpoints go to the one layout
    assert checkpoint_dirs(storage) == ["checkpoints/epoch_0002", "epoch_0003"]
    assert load_checkpoint(find_checkpoint(run))["epoch"] == 3
    for inner in (run / "epoch_0003" / CHECKPOINT, run / "checkpoints" / "epoch_0002", run / "epoch_0003"):
        assert find_run_dir(inner) == run


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
