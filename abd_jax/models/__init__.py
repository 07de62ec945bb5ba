"""Flax (linen) models: classifiers returning (logits, stage features) and the ZSKT generator."""

from abd_jax.models.generator import Generator
from abd_jax.models.registry import (
    MODEL_NAMES,
    check_classifier_fits,
    conv_kernel_paths,
    count_params,
    get_model,
    init_model,
)
from abd_jax.models.resnet import ResNet
from abd_jax.models.vgg import SmallVGG
from abd_jax.models.wrn import WideResNet

__all__ = [
    "MODEL_NAMES",
    "Generator",
    "ResNet",
    "SmallVGG",
    "WideResNet",
    "check_classifier_fits",
    "conv_kernel_paths",
    "count_params",
    "get_model",
    "init_model",
]
