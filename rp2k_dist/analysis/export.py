"""Export a trained checkpoint for serving: ONNX (verified against PyTorch with
onnxruntime) and safetensors, each with a JSON model card next to it (``<file>.json``:
class names, SKUs, meta-categories, input spec, model name and arguments).

The ONNX graph takes what :class:`rp2k_dist.data.transforms.EvalTransform` produces:
``images``, uint8 RGB, NCHW, ``crop_size`` x ``crop_size``, any batch size; the
normalisation (mean/std) is inside the graph, so a consumer only decodes, resizes the
shorter side to ``resize_size`` and centre-crops. Output: ``logits`` [N, classes] (softmax
gives the scores of the evaluation). The graph is written by PyTorch's ``torch.export``
based exporter, whose operators start at opset 18.

Outputs are locations of :mod:`rp2k_dist.storage` (local, mounted, s3://, gs://): each file
is made and checked in a local temporary folder, then moved or uploaded whole.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import run_folder, storage
from ..data.transforms import normalize
from ..evaluation.inference import TrainedModel, load_trained
from ..errors import ExportCheckError

Checkpoint = str | Path | TrainedModel
#: Class facts copied into the model card.
CARD_CLASS_FIELDS = ("index", "global_index", "name", "product_name", "sku", "brand", "type", "shape")


@dataclass
class ExportResult:
    """An exported file, its model card (locations), and (ONNX) the opset and the checked difference."""

    path: str
    card: str
    opset: int | None = None
    max_abs_diff: float | None = None


class ImagesToLogits(nn.Module):
    """uint8 NCHW crops -> logits [N, C]: the checkpoint's model with :func:`normalize` inside."""

    def __init__(self, trained: TrainedModel):
        super().__init__()
        self.model = trained.model
        self.spec = trained.spec

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(normalize(images, self.spec))


def _load(checkpoint: Checkpoint) -> TrainedModel:
    return checkpoint if isinstance(checkpoint, TrainedModel) else load_trained(checkpoint, device="cpu")


def model_card(trained: TrainedModel, weights: str | Path, usage: str) -> dict[str, Any]:
    """What a consumer needs besides the weights, as a JSON-able dict."""
    spec = trained.spec
    return {
        "format": "rp2k-dist-model",
        "weights": storage.basename(weights),
        "usage": usage,
        "model_name": trained.name,
        "model_args": trained.checkpoint["model_args"],
        "epoch": trained.checkpoint["epoch"],
        "input_spec": spec.to_dict(),
        "class_subset": trained.class_subset,
        "classes": [{key: c[key] for key in CARD_CLASS_FIELDS if key in c} for c in trained.classes],
    }


def _write_card(trained: TrainedModel, weights: str, usage: str) -> str:
    card = storage.join(storage.parent(weights), run_folder.model_card(storage.basename(weights)))
    storage.write_text(card, json.dumps(model_card(trained, weights, usage), ensure_ascii=False, indent=1) + "\n")
    return card


def example_images(trained: TrainedModel, batch: int, seed: int = 0) -> torch.Tensor:
    """A random uint8 batch [batch, 3, crop, crop] on the model's device."""
    size = trained.spec.crop_size
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(trained.device)


def export_onnx(
    checkpoint: Checkpoint, out_path: str | Path, opset: int = 18, check_batch: int = 3, atol: float = 1e-3
) -> ExportResult:
    """Write the model as ONNX (uint8 ``images`` -> ``logits``, dynamic batch; see the
    module docstring) and check it: onnxruntime's logits on a random batch of
    ``check_batch`` images (another size than the export's) must match PyTorch's in float32
    within ``atol``, else :class:`ExportCheckError`. ``out_path``: local or a URI."""
    trained = _load(checkpoint)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / storage.basename(out_path)
        opset, diff = _export_and_check(trained, local, opset, check_batch, atol)
        storage.put_file(local, out_path)
    usage = ("onnxruntime: input 'images' uint8 RGB NCHW [N, 3, crop, crop] (decode, resize the shorter side to "
             "resize_size, centre-crop to crop_size; normalisation is in the graph); output 'logits' [N, classes]")
    return ExportResult(str(out_path), _write_card(trained, str(out_path), usage), opset, diff)


def _export_and_check(trained: TrainedModel, out_path: Path, opset: int, check_batch: int,
                      atol: float) -> tuple[int, float]:
    """Export to the local file ``out_path`` and compare onnxruntime's logits with
    PyTorch's; returns (the graph's opset, the largest difference)."""
    import onnx
    import onnxruntime

    wrapper = ImagesToLogits(trained).eval()
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (example_images(trained, 2),), str(out_path), input_names=["images"], output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )
        images = example_images(trained, check_batch, seed=1)
        expected = wrapper(images).float().cpu().numpy()
    session = onnxruntime.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"images": images.cpu().numpy()})[0]
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or not diff <= atol:
        raise ExportCheckError(f"ONNX logits differ from PyTorch's: shape {got.shape} vs {expected.shape}, "
                               f"max abs diff {diff:.3g} > {atol}")
    exported_opset = next(o.version for o in onnx.load(str(out_path), load_external_data=False).opset_import
                          if o.domain in ("", "ai.onnx"))
    return exported_opset, diff


def export_safetensors(checkpoint: Checkpoint, out_path: str | Path) -> ExportResult:
    """Write the model's state dict as safetensors (no optimiser state, no pickle)."""
    from safetensors.torch import save

    trained = _load(checkpoint)
    state = {key: value.detach().cpu().contiguous() for key, value in trained.model.state_dict().items()}
    storage.write_bytes(out_path, save(state, metadata={"format": "pt", "model_name": trained.name}))
    usage = ("state dict of rp2k_dist.models.create_model(model_name, **model_args); input: float NCHW "
             "crops normalised with input_spec mean/std (0..1 scale)")
    return ExportResult(str(out_path), _write_card(trained, str(out_path), usage))
