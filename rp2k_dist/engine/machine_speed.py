"""The machine's reference speed: one number to print beside every timing.

Machines that run this project differ 2-3x in speed, and the same machine from one day to
the next (other tenants, thermal limits), so "334 s" says nothing until one knows how fast
the machine was. :func:`reference_speed` times a fixed workload, ResNet-34 training steps
(forward, backward, SGD) on a batch of 16 random 48 px images with this process's torch
threads, and returns images per second: a few seconds, no data, no Ray. A timing written as
"334 s (reference 76 img/s)" scales to another machine by the ratio of the two references.
"""

from __future__ import annotations

import time

import torch

#: The fixed workload: batch, image size, warm-up and timed steps.
BATCH, SIZE, WARMUP, STEPS = 16, 48, 2, 8


def reference_speed(steps: int = STEPS) -> float:
    """Images per second of ResNet-34 training steps at 48 px on this machine (CPU)."""
    from ..models.registry import create_model

    generator = torch.Generator().manual_seed(0)
    model = create_model("resnet34", num_classes=100)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(BATCH, 3, SIZE, SIZE, generator=generator)
    labels = torch.randint(0, 100, (BATCH,), generator=generator)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return BATCH * steps / (time.perf_counter() - start)


def reference_line(speed: float | None = None) -> str:
    """``machine reference: 76 img/s (ResNet-34 train steps, 48 px, 4 threads)``."""
    speed = reference_speed() if speed is None else speed
    return (f"machine reference: {speed:.0f} img/s (ResNet-34 training steps at {SIZE} px, batch {BATCH}, "
            f"{torch.get_num_threads()} torch threads; rp2k_dist.engine.machine_speed)")
