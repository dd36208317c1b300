"""Architectures by name, pretrained weights, head replacement, freezing and input transforms."""

from __future__ import annotations

from continual.models.classifier import MODES, Classifier, apply_mode, set_train_mode, trainable_parameters
from continual.models.transforms import TransformError, input_shape, make_transform
from continual.models.weights import (
    ModelError,
    UnknownArchitecture,
    WeightsFileError,
    WeightsUnavailable,
    read_state_dict,
)
from continual.models.zoo import BUILTIN, build_model, imagenet_categories, imagenet_model, load_weights

__all__ = [
    "BUILTIN",
    "MODES",
    "Classifier",
    "ModelError",
    "TransformError",
    "UnknownArchitecture",
    "WeightsFileError",
    "WeightsUnavailable",
    "apply_mode",
    "build_model",
    "imagenet_categories",
    "imagenet_model",
    "input_shape",
    "load_weights",
    "make_transform",
    "read_state_dict",
    "set_train_mode",
    "trainable_parameters",
]
