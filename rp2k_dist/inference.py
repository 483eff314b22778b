"""Use a trained checkpoint: rebuild its model and predict shards or images (one process)."""

from __future__ import annotations

from contextlib import nullcontext
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.loader import LoaderConfig, ShardLoader
from .data.manifest import Manifest
from .data.transforms import EvalTransform, InputSpec, normalize
from . import storage
from .engine.checkpoint import FILENAME, load_checkpoint
from .evaluation.predictions import Predictions
from .models import create_model


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


def find_checkpoint(path: str | Path) -> str:
    """A checkpoint file, a checkpoint folder, or a run folder (its latest ``epoch_*``);
    local or a URI (``s3://bucket/runs/NAME``). Returns the checkpoint file's location."""
    info = storage.file_info(path)
    if info.type == storage.pafs.FileType.File:
        return str(path)
    if storage.exists(storage.join(path, FILENAME)):
        return storage.join(path, FILENAME)
    for folder in (str(path), storage.join(path, "checkpoints")):
        epochs = [n for n in storage.listdir(folder) if n.startswith("epoch_")]
        for name in reversed(epochs):
            if storage.exists(storage.join(folder, name, FILENAME)):
                return storage.join(folder, name, FILENAME)
    raise FileNotFoundError(f"no checkpoint at {storage.display(path)}: give a checkpoint.pt, its folder, "
                            "or a run folder with epoch_*/")


def load_trained(path: str | Path, device: str | torch.device | None = None) -> TrainedModel:
    """Rebuild the model of a checkpoint (local or a URI) in eval mode on ``device``
    (default: cuda if present)."""
    checkpoint = load_checkpoint(storage.read_bytes(find_checkpoint(path)))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = create_model(checkpoint["model_name"], **checkpoint["model_args"])
    model.load_state_dict(checkpoint["model"])
    model.to(device).eval()
    s = checkpoint["input_spec"]
    spec = InputSpec(s["crop_size"], s["resize_size"], tuple(s["mean"]), tuple(s["std"]))
    return TrainedModel(model, spec, checkpoint["classes"], checkpoint["class_subset"], checkpoint, device)


@torch.no_grad()
def logits_of(trained: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> float logits [N, C] on the CPU."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if trained.device.type == "cuda" else nullcontext()
    with autocast:
        return trained.model(normalize(images.to(trained.device), trained.spec)).float().cpu()


@torch.no_grad()
def features_of(trained: TrainedModel, images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW batch -> penultimate (pooled) features [N, D] on the CPU."""
    return trained.model.forward_features(normalize(images.to(trained.device), trained.spec)).float().cpu()


def predict_shards(
    trained: TrainedModel, shards: str | Path, split: str = "test", batch_size: int = 64, workers: int = 2,
    restrict_to_subset: bool = True, classes: Sequence[int] | None = None,
) -> Predictions:
    """Top-5 predictions for every sample of ``split`` (labels in the model's label space).

    A specialist (a checkpoint with a class subset) sees only its classes' samples unless
    ``restrict_to_subset`` is False (then it sees every sample, labelled with its global
    class, which is not the specialist's label space: only its top-k are meaningful).
    ``classes`` (global indices, all known to the model): only the samples of these
    classes, scored among these classes only (the model's logits of them); labels and
    top-k are then positions in ``classes``.
    """
    manifest = Manifest.load(shards)
    subset = trained.class_subset if restrict_to_subset else None
    columns = None
    if classes is not None:
        position = {int(c["global_index"]): c["index"] for c in trained.classes}
        unknown = [int(g) for g in classes if int(g) not in position]
        if unknown:
            raise ValueError(f"{trained.name} does not predict global classes {unknown[:10]}")
        subset, columns = list(classes), [position[int(g)] for g in classes]
    loader = ShardLoader(manifest, split, EvalTransform(trained.spec), LoaderConfig(batch_size=batch_size, workers=workers),
                         train=False, classes=subset)
    parts = []
    for b in loader:
        logits = logits_of(trained, b["image"])
        parts.append(Predictions.from_logits(b["key"], b["label"].numpy(), logits if columns is None else logits[:, columns]))
    return Predictions.concat(parts)
