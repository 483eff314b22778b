"""Class-Balanced Loss: weights, and each variant against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rp2k_dist.losses import ClassBalancedLoss, class_balanced_weights

LOGITS = [[2.0, -1.0, 0.5, 0.0], [-0.3, 1.2, 0.1, -2.0], [0.0, 0.0, 3.0, 1.0]]
LABELS = [0, 3, 2]
COUNTS = [1000, 100, 10, 1]


@pytest.mark.parametrize(
    "beta, expected",
    [
        (0.99, [0.035389, 0.055818, 0.370088, 3.538705]),
        (0.9999, [0.003783, 0.036177, 0.360151, 3.599889]),
    ],
)
def test_weights_match_the_worked_example(beta, expected):
    weights = class_balanced_weights(COUNTS, beta)
    assert weights.dtype == torch.float32
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6, rtol=0)
    assert weights.sum().item() == pytest.approx(4.0)


def test_beta_zero_gives_ones():
    assert torch.equal(class_balanced_weights(COUNTS, 0.0), torch.ones(4))


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5])
def test_beta_outside_unit_interval_is_rejected(beta):
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights(COUNTS, beta)


def test_zero_count_class_gets_zero_weight_and_the_rest_sum_to_their_number():
    weights = class_balanced_weights([5, 0, 3], 0.9)
    assert weights[1] == 0
    assert weights[[0, 2]].sum().item() == pytest.approx(2.0)
    assert weights[2] > weights[0]
    loss = ClassBalancedLoss([5, 0, 3], beta=0.9)(torch.randn(4, 3), torch.tensor([0, 2, 2, 0]))
    assert torch.isfinite(loss)


def test_softmax_loss_is_the_mean_of_weighted_cross_entropies():
    loss = ClassBalancedLoss(COUNTS, beta=0.99)(torch.tensor(LOGITS), torch.tensor(LABELS))
    w = class_balanced_weights(COUNTS, 0.99).tolist()
    expected = 0.0
    for row, y in zip(LOGITS, LABELS):
        log_prob = row[y] - math.log(sum(math.exp(z) for z in row))
        expected += -w[y] * log_prob
    expected /= len(LABELS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch_weighted = nn.CrossEntropyLoss(weight=torch.tensor(w))(torch.tensor(LOGITS), torch.tensor(LABELS))
    assert abs(loss.item() - torch_weighted.item()) > 0.1


def test_beta_zero_is_plain_cross_entropy_with_label_smoothing_too():
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    assert torch.allclose(ClassBalancedLoss(COUNTS, beta=0.0)(logits, labels), F.cross_entropy(logits, labels))
    smoothed = ClassBalancedLoss(COUNTS, beta=0.0, label_smoothing=0.1)(logits, labels)
    assert torch.allclose(smoothed, F.cross_entropy(logits, labels, label_smoothing=0.1))


def _numpy_sigmoid_family(logits, labels, weights, gamma):
    """Official CB_loss: sum over batch and classes of w[y_i] * (1 - p_t)^gamma * BCE, / N."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.eye(z.shape[1])[labels]
    p = 1.0 / (1.0 + np.exp(-z))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = np.where(t == 1, p, 1 - p)
    alpha = np.asarray(weights, dtype=np.float64)[labels][:, None]
    return float((alpha * (1 - p_t) ** gamma * bce).sum() / len(labels))


@pytest.mark.parametrize("variant, gamma", [("sigmoid", 0.0), ("focal", 0.5), ("focal", 2.0)])
def test_sigmoid_and_focal_match_numpy(variant, gamma):
    loss = ClassBalancedLoss(COUNTS, beta=0.999, variant=variant, gamma=gamma)
    value = loss(torch.tensor(LOGITS), torch.tensor(LABELS))
    weights = class_balanced_weights(COUNTS, 0.999).numpy()
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(_numpy_sigmoid_family(LOGITS, LABELS, weights, gamma), rel=1e-5)


def test_focal_is_finite_for_extreme_logits():
    logits = torch.tensor([[80.0, -80.0, 0.0, 0.0], [-80.0, 80.0, 0.0, 0.0]], requires_grad=True)
    loss = ClassBalancedLoss(COUNTS, variant="focal", gamma=2.0)(logits, torch.tensor([0, 0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_weights_are_a_buffer_and_bad_settings_are_rejected():
    loss = ClassBalancedLoss(COUNTS)
    assert "weights" in dict(loss.named_buffers())
    assert loss.to(torch.float64).weights.dtype == torch.float64
    with pytest.raises(ValueError, match="variant"):
        ClassBalancedLoss(COUNTS, variant="hinge")
    with pytest.raises(ValueError, match="logits"):
        loss(torch.zeros(2, 5), torch.tensor([0, 1]))
