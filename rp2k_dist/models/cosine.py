"""The cosine head: logits are the scaled cosine similarities of the pooled feature and one
weight vector per class, trained with a margin on the true class's angle.

ArcFace (Deng et al., CVPR 2019, arXiv:1801.07698) adds an angular margin m to the true
class's angle, cos(theta_y + m); CosFace (Wang et al., CVPR 2018, arXiv:1801.09414)
subtracts a cosine margin, cos(theta_y) - m; both then scale every cosine by s and take the
softmax cross-entropy. The class weight matrix W [D, C] and the margin logic are
pytorch-metric-learning's ``losses.ArcFaceLoss`` / ``losses.CosFaceLoss`` (its reducer left
as ``DoNothingReducer``, so the head returns one loss per sample and the engine applies
the Class-Balanced Loss weights w[y] itself, :meth:`~rp2k_dist.losses.ClassBalancedLoss.weighted`).

At evaluation the logits are s x cos(theta_c) without margin, so top-1 / top-5 and every
table read them as any classifier's; the retrieval embedding is the L2-normalised pooled
feature the head sees (:func:`rp2k_dist.evaluation.embeddings.embeddings_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class CosineOutput:
    """What a cosine-head model returns in training: the margin-free logits [N, C] (train
    accuracy) and each sample's margin loss [N] (float32)."""

    logits: Tensor
    losses: Tensor


class CosineHead(nn.Module):
    """features [N, D] -> s x cos(features, W_c) [N, C]; :meth:`losses` gives the margin
    losses. State: ``margin_loss.W`` [D, C], pytorch-metric-learning's layout."""

    def __init__(self, num_classes: int, feature_dim: int, margin_loss: str = "arcface", margin: float = 0.0,
                 scale: float = 64.0):
        super().__init__()
        from pytorch_metric_learning import losses, reducers

        kinds = {"arcface": losses.ArcFaceLoss, "cosface": losses.CosFaceLoss}
        if margin_loss not in kinds:
            raise ValueError(f"margin_loss must be one of {sorted(kinds)}, got {margin_loss!r}")
        # margin 0 = the library's default (ArcFace: 28.6 degrees, CosFace: 0.35)
        options = {"margin": margin} if margin else {}
        self.kind = margin_loss
        self.scale = float(scale)
        self.margin_loss = kinds[margin_loss](num_classes, feature_dim, scale=scale,
                                              reducer=reducers.DoNothingReducer(), **options)

    @property
    def weight(self) -> Tensor:
        """The class weight matrix W [D, C]."""
        return self.margin_loss.W

    def extra_repr(self) -> str:
        return f"{self.kind}, classes={self.weight.shape[1]}, scale={self.scale}"

    def forward(self, features: Tensor) -> Tensor:
        """features [N, D] -> logits s x cos [N, C] (no margin)."""
        return self.scale * (F.normalize(features, dim=1) @ F.normalize(self.weight, dim=0).to(features.dtype))

    def losses(self, features: Tensor, labels: Tensor) -> Tensor:
        """Per-sample margin softmax losses [N] (float32) of ``features`` [N, D] with ``labels`` [N]."""
        out = self.margin_loss(features.float(), labels)
        return out["loss"]["losses"]
