"""API-Net (Zhuang et al., AAAI 2020), as in the official code (PeiqinZhuang/API-Net,
``models.py`` and ``train.py``), on a ResNet-34 backbone.

Training: every image of the batch is paired with its nearest image of the same class and
its nearest image of another class (squared Euclidean distance of the detached pooled
features), which gives 2N pairs (x1, x2) for N images. A mutual vector learnt from each
pair gates both features; the four attentive features are classified by the shared fc, and
a margin ranking loss asks each feature to score its own class higher when gated by its own
gate than by its partner's. Test time: backbone + global average pooling + fc only.

Pairs are formed inside the batch a rank sees (under DDP: the local batch), so every class
in it needs >= 2 images: batches come from a P classes x K images sampler.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import ResNet, resnet34

Criterion = Callable[[Tensor, Tensor], Tensor]


def resnet_trunk(net: ResNet) -> nn.Sequential:
    """A torchvision ResNet without ``avgpool`` and ``fc``: images [N, 3, H, W] -> feature
    map [N, C, H/32, W/32]. Keeps torchvision's module names (``conv1``, ``layer1``...)."""
    return nn.Sequential(OrderedDict((name, m) for name, m in net.named_children() if name not in ("avgpool", "fc")))


def check_pairable(labels: Tensor) -> None:
    """Raise ValueError unless every image of the batch has a same-class partner (another
    image of its class) and an other-class partner."""
    same = labels[:, None] == labels[None, :]
    paired = (same.sum(dim=1) > 1) & (~same).any(dim=1)
    if not bool(paired.all()):
        lonely = sorted(set(labels[~paired].tolist()))
        raise ValueError(
            f"API-Net needs every class in a batch to have >= 2 images and >= 2 classes per batch; "
            f"labels without a partner: {lonely} (batch labels: {labels.tolist()}). "
            f"Use a P classes x K images sampler with K >= 2 and P >= 2."
        )


def pair_indices(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest partners inside a batch, as the official ``get_pairs``.

    features: [N, D] (detached here); labels: [N]. Returns ``intra`` [N], the index of the
    nearest OTHER image with the same label, and ``inter`` [N], the index of the nearest
    image with a different label (squared Euclidean distance, computed in float32 with the
    official ``|a|^2 + |b|^2 - 2 a.b`` expansion; ties go to the lower index).

    Labels on the CPU are checked here (:func:`check_pairable`). On an accelerator the
    check would make the host wait for the device every step, so it is left to the
    sampler: the loader's P x K batches always pair (``tests/test_loader.py``).
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"need features [N, D] and labels [N], got {tuple(features.shape)} and {tuple(labels.shape)}")
    if labels.device.type == "cpu":
        check_pairable(labels)
    same = labels[:, None] == labels[None, :]
    intra_mask = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    inter_mask = ~same
    with torch.autocast(features.device.type, enabled=False):
        x = features.detach().float()
        squared = x.pow(2).sum(dim=1)
        distance = squared[:, None] + squared[None, :] - 2 * x @ x.T
    intra = distance.masked_fill(~intra_mask, float("inf")).argmin(dim=1)
    inter = distance.masked_fill(~inter_mask, float("inf")).argmin(dim=1)
    return intra, inter


@dataclass
class ApiNetOutput:
    """What :class:`ApiNet` returns in training. Row ``j`` of every [2N, C] tensor is pair
    ``j``: pairs ``0..N-1`` are (image i, its intra partner), pairs ``N..2N-1`` are
    (image i, its inter partner). ``*1`` is the first image of a pair (always image i),
    ``*2`` the partner; ``self``/``other``: gated by its own gate or by its partner's."""

    logits_self1: Tensor  # [2N, C]
    logits_other1: Tensor  # [2N, C]
    logits_self2: Tensor  # [2N, C]
    logits_other2: Tensor  # [2N, C]
    labels1: Tensor  # [2N]
    labels2: Tensor  # [2N]
    intra: Tensor  # [N] index of each image's intra-class partner
    inter: Tensor  # [N] index of each image's inter-class partner


def rank_loss(output: ApiNetOutput, margin: float = 0.05) -> Tensor:
    """Official score ranking loss: for x1 and x2 of every pair, the softmax probability of
    the true class from the self-gated feature must beat the one from the other-gated
    feature by ``margin``: mean over 4N terms of max(0, margin - (p_self - p_other))."""
    targets = torch.cat([output.labels1, output.labels2])[:, None]
    self_scores = torch.cat([output.logits_self1, output.logits_self2]).float().softmax(dim=1).gather(1, targets)
    other_scores = torch.cat([output.logits_other1, output.logits_other2]).float().softmax(dim=1).gather(1, targets)
    return F.margin_ranking_loss(self_scores, other_scores, torch.ones_like(self_scores), margin=margin)


class ApiNet(nn.Module):
    """Attentive Pairwise Interaction Network.

    backbone: images [N, 3, H, W] -> feature map [N, feature_dim, h, w] (default: a freshly
    initialised torchvision ResNet-34 trunk, :func:`resnet_trunk`). State-dict keys:
    ``backbone.<torchvision name>`` (``backbone.conv1.weight``, ``backbone.layer4.2.bn2.bias``),
    ``map1.*``, ``map2.*`` and ``fc.*``, so torchvision / ResNet-34 checkpoints map onto
    ``backbone`` + ``fc`` (see :mod:`.weights`).
    """

    head_prefixes = ("fc.", "map1.", "map2.")
    classifier_prefixes = ("fc.",)  # one row per class: sliced by class for a specialist

    def __init__(
        self,
        num_classes: int,
        backbone: nn.Module | None = None,
        feature_dim: int = 512,
        mutual_hidden: int = 512,
        dropout: float = 0.5,
        rank_margin: float = 0.05,
    ):
        super().__init__()
        self.backbone = backbone if backbone is not None else resnet_trunk(resnet34())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.map1 = nn.Linear(2 * feature_dim, mutual_hidden)
        self.map2 = nn.Linear(mutual_hidden, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)
        self.rank_margin = rank_margin

    @property
    def classifier(self) -> nn.Linear:
        return self.fc

    def forward_features(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> pooled features [N, feature_dim]."""
        return torch.flatten(self.pool(self.backbone(images)), 1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor | ApiNetOutput:
        """Training with labels: :class:`ApiNetOutput`. Otherwise (eval mode, or no labels):
        logits [N, C] of backbone + pool + fc, without pairs or dropout."""
        features = self.forward_features(images)
        if not (self.training and labels is not None):
            return self.fc(features)
        intra, inter = pair_indices(features, labels)
        partners = torch.cat([intra, inter])
        x1, x2 = features.repeat(2, 1), features[partners]
        mutual = self.map2(self.drop(self.map1(torch.cat([x1, x2], dim=1))))
        gate1, gate2 = torch.sigmoid(mutual * x1), torch.sigmoid(mutual * x2)
        return ApiNetOutput(
            logits_self1=self.fc(self.drop(gate1 * x1 + x1)),
            logits_other1=self.fc(self.drop(gate2 * x1 + x1)),
            logits_self2=self.fc(self.drop(gate2 * x2 + x2)),
            logits_other2=self.fc(self.drop(gate1 * x2 + x2)),
            labels1=labels.repeat(2),
            labels2=labels[partners],
            intra=intra,
            inter=inter,
        )

    def loss(self, output: ApiNetOutput | Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
        """Official training loss: ``criterion`` over the four logit sets stacked ([8N, C],
        targets labels1 / labels2) + :func:`rank_loss`, weight 1. A plain-logits output
        (eval mode) gives ``criterion(output, labels)``; otherwise ``labels`` is unused
        (the pair labels travel in ``output``)."""
        if isinstance(output, Tensor):
            return criterion(output, labels)
        logits = torch.cat([output.logits_self1, output.logits_self2, output.logits_other1, output.logits_other2])
        targets = torch.cat([output.labels1, output.labels2]).repeat(2)
        return criterion(logits, targets) + rank_loss(output, self.rank_margin)

    def logits(self, output: ApiNetOutput | Tensor) -> Tensor:
        """Main logits [N, C] of each image of the batch: the first N rows of
        ``logits_self1`` (image i gated by its own gate in its intra pair; train-mode
        dropout included). A plain-logits output is returned as is."""
        if isinstance(output, Tensor):
            return output
        return output.logits_self1[: output.intra.shape[0]]

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the backbone (frozen for the first epochs: official 8)."""
        return self.backbone.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained from the start: mutual-vector layers and fc."""
        return chain(self.map1.parameters(), self.map2.parameters(), self.fc.parameters())
