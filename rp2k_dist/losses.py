"""Class-Balanced Loss (Cui et al., CVPR 2019), as in the official code
(richardaecn/class-balanced-loss, ``src/cifar_main.py``).

The effective number of samples of a class with n images is E_n = (1 - beta^n) / (1 - beta);
its weight is proportional to 1 / E_n and the weights are normalised to sum to the number
of classes. The paper this project reproduces uses beta = 0.99; beta = 0 is plain
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VARIANTS = ("softmax", "sigmoid", "focal")


def class_balanced_weights(counts: Sequence[int] | Tensor, beta: float) -> Tensor:
    """Per-class weights [C] (float32): w_c = (1 - beta) / (1 - beta^n_c), normalised so the
    weights of the classes with n_c > 0 sum to their number. A class without training images
    (n_c = 0) cannot be a target: its weight is 0 and it takes no part in the normalisation.
    beta = 0 gives 1 for every class with images. Raises ValueError for beta outside [0, 1),
    negative counts, or no class with images.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    n = torch.as_tensor(counts, dtype=torch.float64)
    if n.ndim != 1 or bool((n < 0).any()):
        raise ValueError("counts must be a 1-d sequence of non-negative class sizes")
    present = n > 0
    if not bool(present.any()):
        raise ValueError("no class has training images")
    weights = torch.where(present, (1.0 - beta) / (1.0 - beta ** n.clamp(min=1)), 0.0)
    return (weights * present.sum() / weights.sum()).float()


class ClassBalancedLoss(nn.Module):
    """Class-Balanced Loss; logits [N, C], labels [N] (int64) -> scalar.

    With w = :func:`class_balanced_weights` and w_i = w[y_i]:

    * ``softmax``: mean_i(w_i * CE_i): the official ``softmax_cross_entropy`` with per-example
      weights, NOT ``nn.CrossEntropyLoss(weight=w)`` (which divides by sum_i w_i).
    * ``sigmoid``: sum_{i,c}(w_i * BCE(z_ic, t_ic)) / N, with one-hot targets t: the official
      weighted sigmoid cross-entropy normalised by the number of positives (N).
    * ``focal``: like ``sigmoid`` with each term multiplied by the official modulator
      exp(-gamma * (t * z + log(1 + exp(-z)))) = (1 - p_t)^gamma.

    ``label_smoothing`` eps: softmax as in ``F.cross_entropy``; sigmoid/focal use the soft
    targets t = (1 - eps) * one_hot + eps / C in the same formulas (the normaliser stays N).
    The weights are a buffer, so they follow ``.to(device)``.
    """

    weights: Tensor

    def __init__(
        self,
        counts: Sequence[int] | Tensor,
        beta: float = 0.99,
        variant: str = "softmax",
        gamma: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.variant = variant
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weights", class_balanced_weights(counts, beta))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, classes={self.weights.numel()}, gamma={self.gamma}"

    def weighted(self, losses: Tensor, labels: Tensor) -> Tensor:
        """mean_i(w[y_i] * losses_i) of per-sample losses [N] computed elsewhere (the cosine
        head's margin softmax): the softmax variant's weighting of any per-sample loss."""
        return (self.weights[labels] * losses.float()).mean()

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        num_classes = self.weights.numel()
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise ValueError(f"expected logits [N, {num_classes}], got {tuple(logits.shape)}")
        logits = logits.float()
        sample_weights = self.weights[labels]
        if self.variant == "softmax":
            ce = F.cross_entropy(logits, labels, reduction="none", label_smoothing=self.label_smoothing)
            return self.weighted(ce, labels)
        targets = F.one_hot(labels, num_classes).float()
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        if self.variant == "focal" and self.gamma:
            loss = loss * torch.exp(-self.gamma * (targets * logits + F.softplus(-logits)))
        return (sample_weights[:, None] * loss).sum() / labels.numel()
