"""The training step never reads a device tensor on the host (CPU check; the GPU check
in tests/test_gpu.py runs the same steps under CUDA's sync debug mode).

A host read of a device tensor (``.item()``, ``if tensor:``, ``.tolist()``...) makes the
host wait until the device has run everything queued so far, so the host cannot queue the
next step while the device computes. On the CPU nothing waits, so these tests count the
Python-level calls that would synchronise on a GPU, step by step.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from rp2k_dist.config import load_config
from rp2k_dist.engine import train as engine_train
from rp2k_dist.engine.optim import warmup_cosine
from rp2k_dist.engine.train import NonFiniteLossError, train_one_epoch
from rp2k_dist.losses import ClassBalancedLoss
from rp2k_dist.models import create_model

# Tensor methods that copy a value to the host: each one waits for the device.
SYNCHRONISING = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")
CLASSES, BATCH, CROP = 4, 8, 32


class SyncCounter:
    """Counts calls of :data:`SYNCHRONISING` methods on any tensor while active."""

    def __init__(self):
        self.calls = 0
        self.names: list[str] = []

    @contextmanager
    def active(self) -> Iterator[SyncCounter]:
        originals = {name: getattr(torch.Tensor, name) for name in SYNCHRONISING}

        def counting(name, method):
            @functools.wraps(method)
            def wrapper(*args, **kwargs):
                self.calls += 1
                self.names.append(name)
                return method(*args, **kwargs)
            return wrapper

        for name, method in originals.items():
            setattr(torch.Tensor, name, counting(name, method))
        try:
            yield self
        finally:
            for name, method in originals.items():
                setattr(torch.Tensor, name, method)


class StepLoader:
    """A loader of ready batches that records the synchronising calls made during each
    step: from handing out a batch until the loop asks for the next one. ``on_steps`` runs
    around the steps after the first (a warm-up step), e.g. to arm CUDA's sync check."""

    def __init__(self, batches, counter: SyncCounter, on_steps=None):
        self.batches, self.counter, self.on_steps = batches, counter, on_steps
        self.stats = SimpleNamespace(skipped=0)
        self.per_step: list[int] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        guard = None
        try:
            for index, batch in enumerate(self.batches):
                if index == 1 and self.on_steps is not None:
                    guard = self.on_steps()
                    guard.__enter__()
                before = self.counter.calls
                yield batch
                self.per_step.append(self.counter.calls - before)
        finally:  # also when a step raised and the loop dropped this iterator
            if guard is not None:
                guard.__exit__(None, None, None)


def make_batches(steps: int, device: torch.device, nan_at: int | None = None, channels_last: bool = False):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for step in range(steps):
        images = torch.randn(BATCH, 3, CROP, CROP, generator=generator)
        if step == nan_at:
            images[0] = float("nan")
        images = images.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = (torch.arange(BATCH) % CLASSES).to(device)
        batches.append((images, labels, [f"{step}-{i}" for i in range(BATCH)]))
    return batches


def run_epoch(loader: StepLoader, device: torch.device, overrides=(), channels_last: bool = False,
              model_name: str = "resnet34"):
    """One ``train_one_epoch`` (ResNet-34 by default) with the engine's optimiser settings;
    returns (metrics, the losses the model computed)."""
    torch.manual_seed(0)
    config = load_config(None, list(overrides))
    model = create_model(model_name, CLASSES).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    losses: list[torch.Tensor] = []
    loss = model.loss

    def recording_loss(*args):
        value = loss(*args)
        losses.append(value.detach().clone())
        return value

    model.loss = recording_loss
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(len(loader), 1))
    criterion = ClassBalancedLoss([10] * CLASSES, 0.99).to(device)
    metrics = train_one_epoch(model=model, model_without_ddp=model, criterion=criterion, optimizer=optimizer,
                              lr_scheduler=scheduler, data_loader=loader, batch_to_device=lambda b: b, device=device,
                              config=config, epoch=0)
    return metrics, losses


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_training_steps_make_no_synchronising_call(grad_clip):
    counter = SyncCounter()
    loader = StepLoader(make_batches(5, torch.device("cpu")), counter)
    with counter.active():
        metrics, losses = run_epoch(loader, torch.device("cpu"), [f"optim.grad_clip={grad_clip}"])
    assert loader.per_step == [0] * 5, counter.names
    # the metrics read once at the end are the same as per-step reads would have given
    assert metrics["train_images"] == 5 * BATCH
    assert metrics["train_loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-6)
    assert 0.0 <= metrics["train_top1"] <= 100.0


def test_metrics_are_read_once_per_check_interval(monkeypatch):
    monkeypatch.setattr(engine_train, "CHECK_EVERY_STEPS", 2)
    counter = SyncCounter()
    loader = StepLoader(make_batches(5, torch.device("cpu")), counter)
    with counter.active():
        run_epoch(loader, torch.device("cpu"))
    assert loader.per_step == [0, 1, 0, 1, 0]


def test_non_finite_loss_is_found_at_the_interval_and_names_its_step(monkeypatch):
    monkeypatch.setattr(engine_train, "CHECK_EVERY_STEPS", 4)
    loader = StepLoader(make_batches(8, torch.device("cpu"), nan_at=5), SyncCounter())
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 0 step 5 \(checked over steps 4-7\).*lower optim.lr"):
        run_epoch(loader, torch.device("cpu"))
    assert len(loader.per_step) == 7  # stopped at the check after step 7, before asking for more


def test_non_finite_loss_in_the_last_partial_interval_is_found_at_the_end(monkeypatch):
    monkeypatch.setattr(engine_train, "CHECK_EVERY_STEPS", 4)
    loader = StepLoader(make_batches(6, torch.device("cpu"), nan_at=4), SyncCounter())
    with pytest.raises(NonFiniteLossError, match=r"step 4 \(checked over steps 4-5\)"):
        run_epoch(loader, torch.device("cpu"))
