"""A backbone stored at bf16 (`FeatureExtractor.cast_backbone`) gives autocast's maps, bit for
bit, and refuses to run at any other precision."""

from __future__ import annotations

import copy

import pytest
import torch

from dfr_core.backbones.registry import list_backbones
from dfr_core.config import ModelConfig
from dfr_core.device import prepare_for_device
from dfr_core.fastpath import extract_regional
from dfr_core.model import build_extractor

VGG19_12 = (
    "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4",
    "relu4_1", "relu4_2", "relu4_3", "relu4_4",
)  # fmt: skip


def _extractors(name: str):
    """(autocast extractor with fp32 weights, the same one stored at bf16), as an actor
    prepares them (channels_last). VGG19 at random init: no weights ship offline."""
    layers = VGG19_12 if name == "vgg19" else ()
    config = ModelConfig(backbone=name, layers=layers, image_size=64 if layers else 128)
    ext = prepare_for_device(
        build_extractor(config, allow_random_init=True).eval(), torch.device("cpu")
    )
    return ext, copy.deepcopy(ext).cast_backbone(torch.bfloat16)


@pytest.mark.parametrize("name", list_backbones())
def test_stored_bf16_weights_give_autocasts_maps_bit_for_bit(name):
    ext, cast = _extractors(name)
    size = ext.input_hw[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    ref = extract_regional(ext, x, torch.bfloat16)
    got = extract_regional(cast, x, torch.bfloat16)
    assert torch.equal(got.fine, ref.fine)
    assert len(got.coarse) == len(ref.coarse)
    assert all(torch.equal(a, b) for a, b in zip(got.coarse, ref.coarse, strict=True))
    convs = [m for m in cast.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in cast.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.weight.dtype == torch.float32 for m in norms)  # autocast leaves them fp32
    assert cast.weights_dtype == torch.bfloat16 and ext.weights_dtype == torch.float32


def test_a_bf16_backbone_refuses_other_precisions():
    ext, cast = _extractors("mobilenet_v2")
    x = torch.randn(1, 3, 128, 128)
    with pytest.raises(ValueError, match="stored at torch.bfloat16"):
        extract_regional(cast, x)  # fp32
    with pytest.raises(ValueError, match="stored at torch.bfloat16"):
        extract_regional(cast, x, torch.float16)
    with pytest.raises(ValueError, match="stored at torch.bfloat16"):
        cast(x)  # the fp32 reference forward
    with pytest.raises(ValueError, match="already torch.bfloat16"):
        cast.cast_backbone(torch.float16)
    assert ext.cast_backbone(torch.float32) is ext  # fp32: nothing to store
    assert ext.weights_dtype == torch.float32
