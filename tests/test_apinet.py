"""API-Net: pair selection, the interaction formulas, the loss, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rp2k_dist.models import ApiNet, ApiNetOutput, pair_indices, rank_loss


def brute_force_pairs(features: list[list[float]], labels: list[int]) -> tuple[list[int], list[int]]:
    def dist(a, b):
        return sum((x - y) ** 2 for x, y in zip(a, b))

    intra, inter = [], []
    for i, (f, y) in enumerate(zip(features, labels)):
        same = [(dist(f, g), j) for j, (g, z) in enumerate(zip(features, labels)) if z == y and j != i]
        other = [(dist(f, g), j) for j, (g, z) in enumerate(zip(features, labels)) if z != y]
        intra.append(min(same)[1])
        inter.append(min(other)[1])
    return intra, inter


def test_pair_indices_on_a_handcrafted_batch():
    # points on a line: class 0 at 0, 3, 10; class 1 at 1, 6; class 2 at 4, 11
    xs, labels = [0.0, 3.0, 10.0, 1.0, 6.0, 4.0, 11.0], [0, 0, 0, 1, 1, 2, 2]
    features = torch.tensor([[x, 0.0] for x in xs])
    intra, inter = pair_indices(features, torch.tensor(labels))
    assert intra.tolist() == [1, 0, 1, 4, 3, 6, 5]
    assert inter.tolist() == [3, 5, 6, 0, 5, 1, 2]
    assert (intra.tolist(), inter.tolist()) == brute_force_pairs(features.tolist(), labels)


def test_pair_indices_match_brute_force_on_random_features():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 5, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 1, 2] * 4)
    intra, inter = pair_indices(features, labels)
    assert (intra.tolist(), inter.tolist()) == brute_force_pairs(features.tolist(), labels.tolist())


@pytest.mark.parametrize("labels", [[0, 0, 1], [3, 3, 3, 3]])
def test_a_class_without_partner_is_a_clear_error(labels):
    with pytest.raises(ValueError, match="partner"):
        pair_indices(torch.randn(len(labels), 4), torch.tensor(labels))


class Flat(nn.Module):
    """Backbone for formula checks: [N, D] inputs -> [N, D, 1, 1] feature maps."""

    def forward(self, x):
        return x[:, :, None, None]


def test_training_output_follows_the_official_formulas():
    torch.manual_seed(0)
    model = ApiNet(num_classes=3, backbone=Flat(), feature_dim=4, mutual_hidden=6, dropout=0.0).train()
    features, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(features, labels)
    intra, inter = pair_indices(features, labels)

    x1 = torch.cat([features, features])
    x2 = torch.cat([features[intra], features[inter]])
    mutual = model.map2(model.map1(torch.cat([x1, x2], dim=1)))
    g1, g2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
    expected = {
        "logits_self1": model.fc(g1 * x1 + x1),
        "logits_other1": model.fc(g2 * x1 + x1),
        "logits_self2": model.fc(g2 * x2 + x2),
        "logits_other2": model.fc(g1 * x2 + x2),
    }
    for name, value in expected.items():
        assert getattr(out, name).shape == (12, 3)
        assert torch.allclose(getattr(out, name), value, atol=1e-6), name
    assert torch.equal(out.labels1, torch.cat([labels, labels]))
    assert torch.equal(out.labels2, torch.cat([labels[intra], labels[inter]]))
    assert torch.equal(out.labels1[:6], out.labels2[:6]) and not torch.equal(out.labels1[6:], out.labels2[6:])
    assert torch.equal(model.logits(out), out.logits_self1[:6])


def _known_output() -> ApiNetOutput:
    labels = torch.tensor([0, 1])
    return ApiNetOutput(
        logits_self1=torch.tensor([[2.0, 0.0], [0.0, 1.0]]),
        logits_other1=torch.tensor([[1.0, 0.0], [0.0, 3.0]]),
        logits_self2=torch.tensor([[0.0, 0.0], [1.0, 0.0]]),
        logits_other2=torch.tensor([[0.5, 0.0], [0.0, 1.0]]),
        labels1=labels,
        labels2=torch.tensor([0, 0]),
        intra=torch.tensor([0]),
        inter=torch.tensor([1]),
    )


def test_rank_loss_equals_a_hand_computation():
    def p(z_true, z_other):  # two-class softmax probability of the true class
        return 1 / (1 + math.exp(z_other - z_true))

    pairs = [  # (self score, other score) for x1 rows then x2 rows
        (p(2, 0), p(1, 0)),
        (p(1, 0), p(3, 0)),
        (p(0, 0), p(0.5, 0)),
        (p(1, 0), p(0, 1)),
    ]
    expected = sum(max(0.0, 0.05 - (s - o)) for s, o in pairs) / 4
    assert rank_loss(_known_output(), margin=0.05).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_criterion_over_four_sets_plus_rank_loss():
    out = _known_output()
    model = ApiNet(num_classes=2, backbone=Flat(), feature_dim=2)
    logits = torch.cat([out.logits_self1, out.logits_self2, out.logits_other1, out.logits_other2])
    targets = torch.tensor([0, 1, 0, 0] * 2)
    expected = F.cross_entropy(logits, targets) + rank_loss(out, 0.05)
    assert torch.allclose(model.loss(out, torch.tensor([0, 1]), F.cross_entropy), expected)


def test_eval_returns_plain_logits_of_backbone_pool_fc():
    torch.manual_seed(0)
    model = ApiNet(num_classes=5)
    images, labels = torch.randn(4, 3, 64, 64), torch.tensor([0, 0, 1, 1])
    model.eval()
    with torch.no_grad():
        logits = model(images, labels)
        expected = model.fc(F.adaptive_avg_pool2d(model.backbone(images), 1).flatten(1))
        assert logits.shape == (4, 5)
        assert torch.allclose(logits, expected, atol=1e-5)
        assert model.forward_features(images).shape == (4, 512)
        model.train()
        model.backbone.eval()  # same batch-norm statistics; without labels: no pairs, no dropout
        assert torch.allclose(model(images), expected, atol=1e-5)


def test_backbone_and_head_parameters_partition_the_model():
    model = ApiNet(num_classes=3)
    backbone, head = set(model.backbone_parameters()), set(model.head_parameters())
    assert not backbone & head
    assert backbone | head == set(model.parameters())
    assert model.classifier is model.fc


def test_a_few_steps_on_a_separable_problem_reduce_the_loss():
    torch.manual_seed(0)
    num_classes, per_class = 3, 4
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = colours[labels][:, :, None, None] + 0.1 * torch.randn(len(labels), 3, 8, 8)
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
    model = ApiNet(num_classes, backbone=backbone, feature_dim=16, mutual_hidden=16).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss = model.loss(model(images, labels), labels, F.cross_entropy)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def _official_loss(out: ApiNetOutput) -> torch.Tensor:
    """PeiqinZhuang/API-Net train.py: nn.CrossEntropyLoss over [self; other] logits with
    targets [labels1, labels2, labels1, labels2] + nn.MarginRankingLoss(margin=0.05)
    between the softmax scores of the true class, self-gated vs other-gated."""
    self_logits = torch.cat([out.logits_self1, out.logits_self2])
    other_logits = torch.cat([out.logits_other1, out.logits_other2])
    targets = torch.cat([out.labels1, out.labels2])
    softmax_loss = nn.CrossEntropyLoss()(torch.cat([self_logits, other_logits]), torch.cat([targets, targets]))
    rows = torch.arange(len(targets))
    self_scores = self_logits.softmax(dim=1)[rows, targets]
    other_scores = other_logits.softmax(dim=1)[rows, targets]
    rank = nn.MarginRankingLoss(margin=0.05)(self_scores, other_scores, torch.ones(len(targets)))
    return softmax_loss + rank


def test_default_api_net_loss_is_the_official_one_and_cbl_only_when_asked_for():
    from rp2k_dist.config import load_config
    from rp2k_dist.engine.optim import build_criterion
    from rp2k_dist.engine.run_data import RunData
    from rp2k_dist.losses import class_balanced_weights

    torch.manual_seed(0)
    model = ApiNet(num_classes=3, backbone=Flat(), feature_dim=4, mutual_hidden=6, dropout=0.0).train()
    features, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = model(features, labels)
    data = RunData(manifest=None, class_subset=None, classes=[], train_counts=[50, 3, 7])  # imbalanced

    default = build_criterion(load_config(None, ["model.name=apinet", "loss.cbl_beta=0.99"]), data)
    assert torch.equal(default.weights, torch.ones(3))
    assert torch.allclose(model.loss(out, labels, default), _official_loss(out), rtol=1e-6, atol=1e-7)

    cbl = build_criterion(load_config(None, ["model.name=apinet", "loss.criterion=cbl", "loss.cbl_beta=0.99"]), data)
    assert torch.allclose(cbl.weights, class_balanced_weights([50, 3, 7], 0.99))
    assert not torch.allclose(model.loss(out, labels, cbl), _official_loss(out), rtol=1e-3)
    # the paper's classifiers keep their Class-Balanced Loss by default; ce turns it off for any model
    assert torch.allclose(build_criterion(load_config(None, ["loss.cbl_beta=0.99"]), data).weights, cbl.weights)
    assert torch.equal(build_criterion(load_config(None, ["loss.criterion=ce"]), data).weights, torch.ones(3))
