"""Models by name (timm style): each entry declares its input spec, so the data transforms
are derived from the model and a 224/299 mismatch cannot happen silently.

Every model :func:`create_model` returns follows one protocol:

* ``forward(images, labels=None)``: in eval mode plain logits [N, C]; in train mode
  whatever the model trains on (logits; InceptionV3: ``(logits, aux_logits)``; API-Net:
  :class:`ApiNetOutput`, which needs the labels). ``labels`` is ignored by models that do
  not need it, so the engine can always pass it.
* ``loss(output, labels, criterion)``: the training loss of such an output, where
  ``criterion(logits, labels)`` is a mean-reduced classification loss.
* ``logits(output)``: the main logits [N, C] of such an output (train accuracy).
* ``forward_features(images)``: pooled penultimate features [N, D] (UMAP embeddings).
* ``classifier``: the ``nn.Linear`` head; ``head_prefixes``: state-dict key prefixes of
  the parts made fresh for a new class count (never required from a weights file);
  ``classifier_prefixes``: those with one row per class (taken by class index from a
  checkpoint of this project, see :func:`~.weights.load_weights_file`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import Inception3, ResNet, inception_v3, resnet34
from torchvision.models.inception import InceptionOutputs

from ..errors import ConfigError
from ..input_spec import InputSpec
from .apinet import ApiNet, Criterion, resnet_trunk
from .cosine import CosineHead, CosineOutput
from .weights import imagenet_state_dict, load_weights_file


@dataclass(frozen=True)
class ModelEntry:
    """A registered architecture. ``build(num_classes, pretrained=False, **kwargs)``;
    ``min_crop_size``: the smallest crop the model trains on."""

    name: str
    input_spec: InputSpec
    build: Callable[..., nn.Module]
    description: str
    min_crop_size: int = 32


MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, input_spec: InputSpec, description: str, min_crop_size: int = 32
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a builder ``build(num_classes, pretrained=False, **kwargs)``."""

    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = ModelEntry(name, input_spec, build, description, min_crop_size)
        return build

    return decorator


def model_names() -> list[str]:
    return sorted(MODELS)


def get_entry(name: str) -> ModelEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(model_names())}") from None


def input_spec(name: str, crop_size: int | None = None) -> InputSpec:
    """The input spec of model ``name``, at ``crop_size`` if given (same resize/crop ratio).
    ``crop_size`` None or 0: the model's own resolution."""
    entry = get_entry(name)
    if not crop_size:
        return entry.input_spec
    if crop_size < entry.min_crop_size:
        raise ConfigError(f"{name} cannot train on {crop_size}px crops (minimum {entry.min_crop_size})")
    return entry.input_spec.scaled(crop_size)


def create_model(
    name: str,
    num_classes: int,
    pretrained: str | None = None,
    weights: str | Path | None = None,
    classes: list[int] | None = None,
    partial_weights: bool = False,
    **kwargs,
) -> nn.Module:
    """Build model ``name`` with a ``num_classes`` head.

    pretrained: None (or "") for random init, "imagenet" for torchvision's ImageNet weights
    from the local torch.hub cache (heads replaced afterwards). weights: a local file loaded
    last, over any ImageNet weights (:func:`load_weights_file`, with ``classes``, the global
    class index of each label, and ``partial_weights``); call :func:`load_weights_file`
    directly to get its report. kwargs go to the builder.
    """
    entry = get_entry(name)
    if pretrained not in (None, "", "imagenet"):
        raise ValueError(f"pretrained must be None or 'imagenet', got {pretrained!r}")
    model = entry.build(num_classes, pretrained=pretrained == "imagenet", **kwargs)
    if weights:
        load_weights_file(model, weights, classes=classes, partial=partial_weights)
    return model


class ResNetClassifier(nn.Module):
    """A torchvision ResNet held as ``self.net``: state-dict keys are torchvision's with the
    prefix ``net.`` (``net.conv1.weight``, ``net.fc.bias``).

    With a :class:`~.cosine.CosineHead` (``cosine``), ``net.fc`` is an identity and the
    head's class weights are ``head.margin_loss.W`` [D, C]: in training with labels the
    forward returns :class:`~.cosine.CosineOutput` and :meth:`loss` weights each sample's
    margin loss by the criterion's class weights."""

    head_prefixes: tuple[str, ...] = ("net.fc.",)
    classifier_prefixes: tuple[str, ...] = ("net.fc.",)

    def __init__(self, net: ResNet, cosine: CosineHead | None = None):
        super().__init__()
        self.net = net
        self.head = cosine
        if cosine is not None:
            net.fc = nn.Identity()
            # W is [D, C] (columns per class): new for a new class count, never sliced by row
            self.head_prefixes, self.classifier_prefixes = ("head.",), ()

    @property
    def classifier(self) -> nn.Module:
        return self.net.fc if self.head is None else self.head

    def forward_features(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> pooled features [N, 512] (ResNet-34)."""
        net = self.net
        x = net.maxpool(net.relu(net.bn1(net.conv1(images))))
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor | CosineOutput:
        """images [N, 3, H, W] -> logits [N, C]; a cosine head in training with ``labels``:
        :class:`~.cosine.CosineOutput`."""
        if self.head is None:
            return self.net(images)
        features = self.net(images)  # net.fc is the identity: pooled features [N, D]
        logits = self.head(features)
        if self.training and labels is not None:
            return CosineOutput(logits, self.head.losses(features, labels))
        return logits

    def loss(self, output: Tensor | CosineOutput, labels: Tensor, criterion: Criterion) -> Tensor:
        """criterion(logits, labels); a cosine head's margin losses weighted by the
        criterion's per-class weights (``criterion.weighted``, the Class-Balanced Loss)."""
        if isinstance(output, CosineOutput):
            return criterion.weighted(output.losses, labels)
        return criterion(output, labels)

    def logits(self, output: Tensor | CosineOutput) -> Tensor:
        return output.logits if isinstance(output, CosineOutput) else output


class InceptionClassifier(nn.Module):
    """A torchvision Inception3 (with its auxiliary classifier) held as ``self.net``:
    state-dict keys are torchvision's with the prefix ``net.`` (``net.Mixed_7c...``,
    ``net.fc.weight``, ``net.AuxLogits.fc.weight``).

    Train mode returns ``InceptionOutputs(logits, aux_logits)`` and needs crops >= 299 px
    (the auxiliary head's 5x5 conv); eval mode returns logits and works from 75 px.
    """

    head_prefixes = ("net.fc.", "net.AuxLogits.fc.")
    classifier_prefixes = ("net.fc.", "net.AuxLogits.fc.")
    _trunk = (
        "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
        "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
    )  # fmt: skip

    def __init__(self, net: Inception3, aux_weight: float = 0.4):
        super().__init__()
        self.net = net
        self.aux_weight = aux_weight

    @property
    def classifier(self) -> nn.Linear:
        return self.net.fc

    def forward_features(self, images: Tensor) -> Tensor:
        """images [N, 3, H, W] -> pooled features [N, 2048]."""
        x = self.net._transform_input(images)
        for name in self._trunk:
            x = getattr(self.net, name)(x)
        return torch.flatten(self.net.avgpool(x), 1)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> InceptionOutputs | Tensor:
        """Train mode: ``InceptionOutputs(logits, aux_logits)``, each [N, C]; eval: logits."""
        return self.net(images)

    def loss(self, output: InceptionOutputs | Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
        """criterion(logits) + aux_weight * criterion(aux_logits); plain logits: criterion(logits)."""
        if isinstance(output, Tensor):
            return criterion(output, labels)
        return criterion(output.logits, labels) + self.aux_weight * criterion(output.aux_logits, labels)

    def logits(self, output: InceptionOutputs | Tensor) -> Tensor:
        return output if isinstance(output, Tensor) else output.logits


@register_model("resnet34", InputSpec(224, 256), "ResNet-34 (torchvision): the paper's main classifier")
def build_resnet34(num_classes: int, pretrained: bool = False, head: str = "softmax", margin_loss: str = "arcface",
                   margin: float = 0.0, scale: float = 64.0) -> ResNetClassifier:
    """``head``: softmax (a linear layer) or cosine (:class:`~.cosine.CosineHead` with
    ``margin_loss``, ``margin`` and ``scale``)."""
    if head not in ("softmax", "cosine"):
        raise ConfigError(f"model.head must be softmax or cosine, got {head!r}")
    net = resnet34(num_classes=num_classes) if not pretrained else resnet34()
    if pretrained:
        net.load_state_dict(imagenet_state_dict("resnet34"))
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    if head == "softmax":
        return ResNetClassifier(net)
    return ResNetClassifier(net, CosineHead(num_classes, net.fc.in_features, margin_loss, margin, scale))


@register_model(
    "inception_v3",
    InputSpec(299, 342),
    "InceptionV3 (torchvision) with its auxiliary classifier, loss main + 0.4 aux",
    min_crop_size=299,
)
def build_inception_v3(num_classes: int, pretrained: bool = False, aux_weight: float = 0.4) -> InceptionClassifier:
    # transform_input=True always: the Google weights expect inputs in [-1, 1]; the model maps
    # ImageNet-normalised inputs there itself, so every run and checkpoint uses the same input.
    if not pretrained:
        net = inception_v3(num_classes=num_classes, aux_logits=True, transform_input=True, init_weights=True)
        return InceptionClassifier(net, aux_weight)
    net = inception_v3(aux_logits=True, transform_input=True, init_weights=False)
    net.load_state_dict(imagenet_state_dict("inception_v3"))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    net.AuxLogits.fc = nn.Linear(net.AuxLogits.fc.in_features, num_classes)
    return InceptionClassifier(net, aux_weight)


@register_model(
    "apinet",
    InputSpec(224, 256),
    "API-Net on a ResNet-34 backbone (official code: 448 px crops, crop_size=448)",
)
def build_apinet(num_classes: int, pretrained: bool = False, **kwargs) -> ApiNet:
    """kwargs: :class:`ApiNet` options (mutual_hidden, dropout, rank_margin)."""
    net = resnet34()
    if pretrained:
        net.load_state_dict(imagenet_state_dict("resnet34"))
    return ApiNet(num_classes, backbone=resnet_trunk(net), feature_dim=net.fc.in_features, **kwargs)
