"""GPU behaviour (skipped without CUDA): run by bench/gpu_check.sh on a GPU machine."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_channels_last_step_is_finite_and_learns():
    from rp2k_dist.losses import ClassBalancedLoss
    from rp2k_dist.models import create_model

    model = create_model("resnet34", 10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(32, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.arange(32, device="cuda") % 10
    criterion = ClassBalancedLoss([10] * 10, 0.99).cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    losses = []
    for _ in range(15):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(model(x, y), y, criterion)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_device_decode_matches_cpu_decode():
    from rp2k_dist.data.device_transforms import decode_batch

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)).save(buffer, "JPEG")
    cuda, cpu = decode_batch([buffer.getvalue()] * 4, torch.device("cuda")), decode_batch([buffer.getvalue()], torch.device("cpu"))
    assert cuda[0].is_cuda and (cuda[0].cpu().int() - cpu[0].int()).abs().float().mean() < 2


def test_nccl_backend_with_one_ray_train_worker(own_ray, tmp_path):
    import ray

    from rp2k_dist.config import load_config
    from rp2k_dist.data.pack import PackConfig, pack_dataset
    from rp2k_dist.data.rp2k import scan_rp2k
    from rp2k_dist.data.synth import SynthConfig, make_synthetic_rp2k
    from rp2k_dist.launch.trainer import run_training

    summary = make_synthetic_rp2k(tmp_path / "rp2k", SynthConfig(classes=8, images_per_class=16, image_size=96))
    pack_dataset(scan_rp2k(summary.root, summary.metadata_path), tmp_path / "shards", PackConfig(shorter_side=96))
    config = load_config(None, [f"data.shards={tmp_path / 'shards'}", f"run.storage_path={tmp_path / 'runs'}",
                                "run.name=nccl", "run.workers=1", "run.use_gpu=true", "run.backend=nccl",
                                "data.batch_size=16", "model.crop_size=64", "optim.epochs=1", "data.decode=device"])
    ray.init(address="local", num_gpus=1, include_dashboard=False)
    try:
        final = run_training(config)
    finally:
        ray.shutdown()
    assert final["epoch"] == 1 and final["val_samples"] > 0


@pytest.mark.parametrize("model_name", ["resnet34", "apinet"])
def test_training_steps_do_not_synchronise(model_name):
    """The engine's steps (bf16, channels_last, fused SGD) under CUDA's sync debug mode:
    any host-device synchronisation inside a step raises (API-Net: its pairing too)."""
    from contextlib import contextmanager

    from tests.test_step_sync import BATCH, StepLoader, SyncCounter, make_batches, run_epoch

    @contextmanager
    def synchronisation_is_an_error():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    device = torch.device("cuda")
    loader = StepLoader(make_batches(6, device, channels_last=True), SyncCounter(), on_steps=synchronisation_is_an_error)
    metrics, losses = run_epoch(loader, device, channels_last=True, model_name=model_name)
    assert len(loader.per_step) == 6 and metrics["train_images"] == 6 * BATCH
    assert metrics["train_loss"] == pytest.approx(float(torch.stack(losses).float().mean()), rel=1e-3)
