"""BatchNorm while training (``model.bn``): train, frozen or sync.

* ``train``: PyTorch's default. Every training step normalises by the batch's statistics
  and moves the running statistics towards them: also in API-Net's frozen-backbone epochs,
  as the official code does (``model.train()`` throughout, PeiqinZhuang/API-Net
  ``train.py``).
* ``frozen``: every BatchNorm layer stays in eval mode and its affine parameters get no
  gradient, for the whole run: a specialist keeps the statistics the general model
  estimated on the whole dataset instead of re-estimating them from P x K batches of a few
  classes, and its features do not shift when the backbone unfreezes.
* ``sync``: :class:`torch.nn.SyncBatchNorm` under DDP (batch statistics over the global
  batch, every rank's images). At world size 1 nothing is converted. PyTorch's
  SyncBatchNorm runs on accelerators only (DDP refuses it in a CPU model); on CPU (gloo:
  tests and the CPU demo) :class:`GlooSyncBatchNorm` computes the same statistics with a
  differentiable all-reduce.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn import functional as dist_nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (SyncBatchNorm included), in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def freeze_batchnorm(model: nn.Module) -> int:
    """Turn off the gradient of every BatchNorm weight and bias (before DDP wraps the
    model, so DDP leaves them out); returns the number of layers."""
    layers = batchnorm_layers(model)
    for layer in layers:
        for param in layer.parameters(recurse=False):
            param.requires_grad_(False)
    return len(layers)


def batchnorm_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode (running statistics used and left unchanged);
    call after ``model.train()``, which sets them back to training mode."""
    for layer in batchnorm_layers(model):
        layer.eval()


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm with statistics over every rank's batch, for CPU tensors (gloo).

    PyTorch's :class:`torch.nn.SyncBatchNorm` runs on accelerators only, and DDP refuses
    it in a CPU model, so this is a separate layer with the same parameters and buffers. In
    training under a process group of more than one rank, the per-channel sum, sum of
    squares and count of the local batch (float64) are summed over the ranks with
    ``torch.distributed.nn.functional.all_reduce``, whose backward all-reduces the gradient:
    each rank's input gradient is that of the loss summed over the ranks, as with PyTorch's
    SyncBatchNorm. Normalisation uses the biased global variance, the running variance the
    unbiased one (as ``F.batch_norm``). Otherwise (eval mode, one process) it is BatchNorm.
    """

    def __init__(self, *args, process_group: dist.ProcessGroup | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            return super().forward(input)
        self._check_input_dim(input)
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        x = input.double()
        count = torch.full((1,), input.numel() / channels, dtype=torch.float64, device=input.device)
        total = dist_nn.all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]), group=group)
        n = total[-1]
        mean = total[:channels] / n
        var = (total[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
                self.running_var.mul_(1 - factor).add_(factor * unbiased.to(self.running_var.dtype))
        shape = [1, channels] + [1] * (input.dim() - 2)
        out = ((x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)).to(input.dtype)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


#: Layers that synchronise their statistics over the ranks.
SYNC_LAYERS = (nn.SyncBatchNorm, GlooSyncBatchNorm)


def _gloo_sync(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by a :class:`GlooSyncBatchNorm`
    sharing its parameters and buffers (as ``convert_sync_batchnorm`` does)."""
    out = module
    if isinstance(module, _BatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _gloo_sync(child))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer of ``model`` synchronised over the ranks, with the same
    parameters and buffers (checkpoints load into the plain model): PyTorch's
    :class:`torch.nn.SyncBatchNorm` on accelerators, :class:`GlooSyncBatchNorm` on CPU."""
    if device.type == "cpu":
        return _gloo_sync(model)
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def synced_layers(model: nn.Module) -> int:
    """How many layers of ``model`` synchronise BatchNorm statistics over the ranks."""
    return sum(isinstance(m, SYNC_LAYERS) for m in model.modules())


def prepare_batchnorm(model: nn.Module, mode: str, world_size: int, device: torch.device) -> nn.Module:
    """The model as ``model.bn`` wants it before DDP wraps it: ``frozen`` turns off the
    BatchNorm parameters' gradients (the engine also calls :func:`batchnorm_eval` at every
    epoch start), ``sync`` converts the layers when ``world_size`` > 1, ``train`` changes
    nothing."""
    if mode == "frozen":
        freeze_batchnorm(model)
    elif mode == "sync" and world_size > 1:
        model = convert_sync_batchnorm(model, device)
    return model
