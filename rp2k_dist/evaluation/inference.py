"""Use a trained checkpoint: rebuild its model and predict shards or images (one process).

:func:`predict_batches` is the one prediction loop: training-time evaluation, ``rp2k
ensemble`` (:func:`predict_shards`) and, batch by batch, ``rp2k predict`` and ``rp2k umap``
(:func:`logits_of`, :func:`features_of`) all run the model under the same :func:`autocast`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import storage
from ..config import DataConfig
from ..data.loader import LoaderConfig, ShardLoader
from ..data.manifest import Manifest
from ..data.transforms import EvalTransform, normalize
from ..errors import CheckpointError, DataError
from ..input_spec import InputSpec
from ..models import create_model
from ..run_folder import find_checkpoint, load_checkpoint
from .predictions import Predictions


@dataclass
class TrainedModel:
    """A model rebuilt from a checkpoint, with what it needs to be used."""

    model: nn.Module
    spec: InputSpec
    classes: list[dict[str, Any]]  # the model's label space ("global_index": index in the dataset)
    class_subset: list[int] | None  # global indices of a specialist's classes, else None
    checkpoint: dict[str, Any]
    device: torch.device

    @property
    def name(self) -> str:
        return self.checkpoint["model_name"]


def load_trained(path: str | Path, device: str | torch.device | None = None) -> TrainedModel:
    """Rebuild the model of a checkpoint (local or a URI) in eval mode on ``device``
    (default: cuda if present)."""
    checkpoint = load_checkpoint(storage.read_bytes(find_checkpoint(path)))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(checkpoint["model_name"], **checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    spec = InputSpec.from_dict(checkpoint["input_spec"])
    return TrainedModel(model, spec, checkpoint["classes"], checkpoint["class_subset"], checkpoint, device)


def autocast(device: torch.device, enabled: bool = True) -> AbstractContextManager:
    """bf16 autocast on CUDA (the precision the engine trains in), nothing elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()


@torch.no_grad()
def predict_batches(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]], device: torch.device,
    *, amp: bool = True, columns: Sequence[int] | None = None, groups: Sequence[Sequence[int]] | None = None,
) -> Predictions | None:
    """Top-5 predictions of ``(normalised images on device, labels, keys)`` batches, in eval
    mode; None when there was no batch (a rank with no evaluation samples). ``columns``:
    score among these logits only (top-k are then positions in ``columns``). ``groups``:
    keep each group's probability mass (:attr:`Predictions.mass`)."""
    model.eval()
    parts = []
    for images, labels, keys in batches:
        with autocast(device, amp):
            logits = model(images)
        if columns is not None:
            logits = logits[:, list(columns)]
        parts.append(Predictions.from_logits(keys, labels.cpu().numpy(), logits.float().cpu(), groups=groups))
    return Predictions.concat(parts) if parts else None


@torch.no_grad()
def logits_of(trained: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float logits [N, C] on the CPU."""
    with autocast(trained.device):
        return trained.model(normalize(images.to(trained.device), trained.spec)).float().cpu()


@torch.no_grad()
def features_of(trained: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> penultimate (pooled) features [N, D] on the CPU."""
    return trained.model.forward_features(normalize(images.to(trained.device), trained.spec)).float().cpu()


def predict_shards(
    trained: TrainedModel, shards: str | Path, split: str = "test", batch_size: int = 64, workers: int = 2,
    restrict_to_subset: bool = True, classes: Sequence[int] | None = None,
    groups: Sequence[Sequence[int]] | None = None, holdout: float = 0.0, holdout_by: str = "groups",
) -> Predictions:
    """Top-5 predictions for every sample of ``split`` (labels in the model's label space).

    A specialist (a checkpoint with a class subset) sees only its classes' samples unless
    ``restrict_to_subset`` is False (then it sees every sample, labelled with its global
    class, which is not the specialist's label space: only its top-k are meaningful).
    ``classes`` (global indices, all known to the model): only the samples of these
    classes, scored among these classes only (the model's logits of them); labels and
    top-k are then positions in ``classes``. ``groups``: class indices (the model's labels)
    whose probability mass to keep (:attr:`Predictions.mass`). ``holdout``: the share of
    train held out (``data.holdout``, drawn ``holdout_by``), needed for ``split="holdout"``.
    """
    manifest = Manifest.load(shards)
    subset = trained.class_subset if restrict_to_subset else None
    columns = None
    if classes is not None:
        position = {int(c["global_index"]): c["index"] for c in trained.classes}
        unknown = [int(g) for g in classes if int(g) not in position]
        if unknown:
            raise CheckpointError(f"{trained.name} does not predict global classes {unknown[:10]}",
                                  hint="was it trained on these shards?")
        subset, columns = list(classes), [position[int(g)] for g in classes]
    settings = LoaderConfig(DataConfig(batch_size=batch_size, loader_workers=workers, holdout=holdout,
                                       holdout_by=holdout_by))
    # a run's unseen classes (data.holdout_classes) stay out, as in its own evaluation
    unseen = [int(c["global_index"]) for c in trained.classes if c.get("unseen")]
    loader = ShardLoader(manifest, split, EvalTransform(trained.spec), settings, train=False, classes=subset,
                         exclude=unseen)
    device = trained.device
    batches = ((normalize(b["image"].to(device), trained.spec), b["label"], b["key"]) for b in loader)
    predictions = predict_batches(trained.model, batches, device, columns=columns, groups=groups)
    if predictions is None:
        raise DataError(f"{storage.display(shards)} has no {split} samples for this model")
    return predictions
