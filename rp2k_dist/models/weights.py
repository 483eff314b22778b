"""Initial weights from local files only: no machine of this project reaches a weights host.

Two sources:

* :func:`imagenet_state_dict`: torchvision's ImageNet weights, read from torch.hub's cache
  (``$TORCH_HOME/hub/checkpoints/<file>``) exactly where torchvision would have saved them.
  A missing file is an error that says which file to place where; nothing is downloaded.
* :func:`load_weights_file`: any local file holding a torchvision state dict, a state dict of
  this project's models, or a checkpoint of this project (state dict under ``"model"``).
  Keys are matched by their *canonical* name, the key without the wrapper prefixes
  ``module.`` (DDP), ``_orig_mod.`` (torch.compile), ``net.`` (:class:`ResNetClassifier`,
  :class:`InceptionClassifier`) and ``backbone.`` (:class:`ApiNet`); so a ResNet-34
  checkpoint loads into API-Net's backbone and fc, and vice versa.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import Inception_V3_Weights, ResNet34_Weights, WeightsEnum

IMAGENET_WEIGHTS: dict[str, WeightsEnum] = {
    "resnet34": ResNet34_Weights.IMAGENET1K_V1,
    "inception_v3": Inception_V3_Weights.IMAGENET1K_V1,
}

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "net.", "backbone.")


class WeightsNotFoundError(FileNotFoundError):
    """A weights file that should be on local disk is not there."""


def imagenet_file(name: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``name`` in torch.hub's cache."""
    weights = _imagenet_weights(name)
    file_name = os.path.basename(urlparse(weights.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def imagenet_state_dict(name: str) -> dict[str, Tensor]:
    """torchvision's ImageNet state dict of ``name`` ("resnet34" | "inception_v3"), loaded
    from the torch.hub cache without network (1000-class heads, torchvision key names).

    Raises :class:`WeightsNotFoundError` naming the file, the folder and the download URL
    when the file is not cached.
    """
    path = imagenet_file(name)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {name!r} are not in the torch.hub cache and are never downloaded "
            f"here: place the file {path.name} in the folder {path.parent} (fetch it on a machine with "
            f"network from {_imagenet_weights(name).url}), or point TORCH_HOME at a folder whose "
            f"hub/checkpoints holds it."
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_file(model: nn.Module, path: str | Path, strict_backbone: bool = True) -> list[str]:
    """Load the local file ``path`` into ``model`` in place.

    Accepted contents: a plain torchvision state dict, a state dict of any model of this
    project, or a checkpoint dict with the state dict under ``"model"`` (other keys are
    ignored). A tensor is loaded when its canonical key (see the module docstring) exists in
    the model with the same shape; file tensors the model does not have are ignored.

    Returns the model keys left at their initial values (a head for another class count,
    API-Net's mutual-vector layers when loading a ResNet-34), ``num_batches_tracked``
    counters excepted. With ``strict_backbone`` every key outside the model's
    ``head_prefixes`` (an attribute of this project's models; everything counts as
    backbone for other modules) must load, else :class:`ValueError`. A file from which no
    tensor loads at all raises :class:`ValueError`; a missing file
    :class:`WeightsNotFoundError`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict or a checkpoint dict")
    source = {_canonical(key): value for key, value in state.items() if isinstance(value, Tensor)}

    loaded: dict[str, Tensor] = {}
    left: list[str] = []
    for key, current in model.state_dict().items():
        tensor = source.get(_canonical(key))
        if tensor is not None and tensor.shape == current.shape:
            loaded[key] = tensor
        elif not key.endswith("num_batches_tracked"):
            left.append(key)
    if not loaded:
        raise ValueError(f"nothing matched: no tensor of {path} fits {type(model).__name__} (by name and shape)")
    if strict_backbone:
        head_prefixes = tuple(getattr(model, "head_prefixes", ()))
        missing = [key for key in left if not key.startswith(head_prefixes)]
        if missing:
            raise ValueError(
                f"{path} lacks {len(missing)} backbone tensors of {type(model).__name__} (or has them with "
                f"other shapes), e.g. {missing[:5]}; pass strict_backbone=False to load it partially"
            )
    model.load_state_dict(loaded, strict=False)
    return left


def _imagenet_weights(name: str) -> WeightsEnum:
    try:
        return IMAGENET_WEIGHTS[name]
    except KeyError:
        raise ValueError(f"no ImageNet weights for {name!r}; known: {sorted(IMAGENET_WEIGHTS)}") from None


def _canonical(key: str) -> str:
    """``key`` without leading wrapper prefixes: ``module._orig_mod.net.conv1.weight`` -> ``conv1.weight``."""
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key
