"""Frozen ImageNet feature extractors (the "pretrained CNN" of DFR section 3.1).

A backbone is registered with every selectable layer's channel count and stride, so callers can
size the reconstruction network and the regional grid without running a forward pass. The
registry is verified against real forward passes by the unit tests.

The package: ``spec`` (what a backbone declares) | ``vgg19``, ``mobilenet_v2``,
``efficientnet_lite`` (lite0/1/2: one spec each) | ``registry`` | ``weights`` (resolution,
loading, sha256) | ``extractor`` (FeatureBackbone, build_backbone).
"""

from dfr_core.backbones.extractor import FeatureBackbone, build_backbone, default_weights_path
from dfr_core.backbones.registry import backbone_info, list_backbones
from dfr_core.backbones.spec import BackboneInfo, LayerInfo
from dfr_core.backbones.weights import RANDOM_INIT, WeightsNotFoundError, sha256_file
from dfr_core.preprocess import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RANDOM_INIT",
    "BackboneInfo",
    "FeatureBackbone",
    "LayerInfo",
    "WeightsNotFoundError",
    "backbone_info",
    "build_backbone",
    "default_weights_path",
    "list_backbones",
    "sha256_file",
]
