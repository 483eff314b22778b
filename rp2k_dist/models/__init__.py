"""Models of the paper by name: ResNet-34, InceptionV3 and API-Net (see :mod:`.registry`)."""

from .apinet import ApiNet, ApiNetOutput, pair_indices, rank_loss, resnet_trunk
from .registry import (
    MODELS,
    InceptionClassifier,
    ModelEntry,
    ResNetClassifier,
    create_model,
    get_entry,
    input_spec,
    model_names,
    register_model,
)
from .weights import LoadReport, WeightsNotFoundError, imagenet_file, imagenet_state_dict, load_weights_file

__all__ = [
    "MODELS",
    "ApiNet",
    "ApiNetOutput",
    "InceptionClassifier",
    "LoadReport",
    "ModelEntry",
    "ResNetClassifier",
    "WeightsNotFoundError",
    "create_model",
    "get_entry",
    "imagenet_file",
    "imagenet_state_dict",
    "input_spec",
    "load_weights_file",
    "model_names",
    "pair_indices",
    "rank_loss",
    "register_model",
    "resnet_trunk",
]
