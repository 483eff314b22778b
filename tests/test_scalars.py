"""TensorBoard event files of a run hold exactly the numbers of metrics.jsonl."""

from __future__ import annotations

import json
import math
import struct

import pytest
from tensorboardX.proto import event_pb2

from rp2k_dist.config import load_config
from rp2k_dist.engine.context import LocalContext
from rp2k_dist.engine.train import train_worker
from rp2k_dist.storage import RunStorage
from tests.conftest import tiny_run_overrides


def read_scalars(folder) -> dict[int, dict[str, float]]:
    """{step: {tag: value}} as TensorBoard shows it: event files in write order, and a
    writer's ``purge_step`` (a SessionLog START at that step) drops the steps from there on."""
    steps: dict[int, dict[str, float]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps = {s: v for s, v in steps.items() if s < event.step}
            for value in event.summary.value:
                steps.setdefault(event.step, {})[value.tag] = value.simple_value
    return steps


def _run(shards, tmp_path, epochs):
    config = load_config(None, tiny_run_overrides(shards.root, tmp_path, "tb", epochs))
    storage = RunStorage(config.run.storage_path, config.run.name)
    train_worker(config, LocalContext(storage, "cpu", keep=3))
    return storage


def test_event_files_equal_metrics_jsonl_across_a_resume(synth_shards, tmp_path):
    storage = _run(synth_shards, tmp_path, epochs=2)
    # as if the run died after logging epoch 2 but before its checkpoint: epoch 2 runs again
    storage.delete_dir("epoch_0002")
    storage = _run(synth_shards, tmp_path, epochs=3)
    history = [json.loads(line) for line in storage.read_bytes("metrics.jsonl").decode().splitlines()]
    scalars = read_scalars(storage.local_path("tensorboard"))
    assert sorted(scalars) == [1, 2, 3] == [m["epoch"] for m in history]
    for row in history:
        expected = {k: float(v) for k, v in row.items()
                    if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        assert set(scalars[row["epoch"]]) == set(expected)
        for tag, value in expected.items():
            assert scalars[row["epoch"]][tag] == pytest.approx(value, rel=1e-6), tag  # stored as float32
    assert "resumed_from_epoch" in scalars[2]  # the second attempt's epoch 2, not the first's
