"""Winograd F(2x2, 3x3) (`dfr_core.winograd`) computes the convolution it replaces to fp32
rounding, replaces exactly the convolutions it applies to, and a prepared fp32 CPU extractor
(`dfr_core.inference.prepare_extractor`) gives the reference's error grid."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfr_core import winograd
from dfr_core.config import ModelConfig
from dfr_core.fastpath import extract_regional, folded_head, reference_error_grid
from dfr_core.inference import prepare_extractor
from dfr_core.model import DFRHead, build_extractor
from dfr_core.precision import PrecisionSpec
from dfr_core.winograd import Winograd3x3, eligible, use_winograd

VGG19_12 = (
    "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4",
    "relu4_1", "relu4_2", "relu4_3", "relu4_4",
)  # fmt: skip

CPU = torch.device("cpu")


def _conv(cin: int, cout: int, bias: bool = True, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
    with torch.no_grad():
        conv.weight.mul_(3.0)  # weights of a trained layer's scale, not init's tiny ones
        if bias:
            conv.bias.uniform_(-0.5, 0.5)
    return conv.eval()


def _rel_err(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


@pytest.mark.parametrize(
    ("cin", "cout", "shape", "bias", "channels_last"),
    [
        (256, 64, (2, 16, 16), True, True),  # batch of 2, even sides
        (256, 96, (1, 15, 9), True, False),  # odd sides (a padded tile row and column), NCHW
        (260, 40, (1, 7, 12), False, True),  # no bias, odd height
        (256, 32, (1, 2, 2), True, True),  # a single tile
    ],
)
def test_equals_the_convolution_to_fp32_rounding(cin, cout, shape, bias, channels_last):
    conv = _conv(cin, cout, bias)
    n, h, w = shape
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(1)).relu()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = Winograd3x3(conv)(x)
        direct = conv(x)
        exact = F.conv2d(x.double(), conv.weight.double(), bias=None, padding=1)
        if bias:
            exact = exact + conv.bias.double()[:, None, None]
    assert got.shape == direct.shape and got.dtype == torch.float32
    assert got.is_contiguous(memory_format=torch.channels_last)
    # fp32 rounding: within a few times oneDNN's own fp32 error against float64
    assert _rel_err(got, exact) < max(4 * _rel_err(direct, exact), 1e-6)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-5 * direct.abs().max().item())


def test_bands_of_tile_rows_give_the_whole_map(monkeypatch):
    conv = _conv(256, 48)
    x = torch.randn(1, 256, 20, 14, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = Winograd3x3(conv)(x)
        # one tile row per band (16 x 7 tiles x 256 channels x 4 bytes each)
        monkeypatch.setattr(winograd, "BAND_BYTES", 16 * 7 * 256 * 4)
        banded = Winograd3x3(conv)(x)
    assert torch.equal(banded, whole)


def test_eligible_convolutions_only():
    assert eligible(_conv(256, 8))
    assert not eligible(_conv(255, 8))  # narrower than MIN_CHANNELS: the transforms cost more
    assert not eligible(nn.Conv2d(256, 8, 3, stride=2, padding=1))
    assert not eligible(nn.Conv2d(256, 8, 3, padding=2, dilation=2))
    assert not eligible(nn.Conv2d(256, 256, 3, padding=1, groups=256))
    assert not eligible(nn.Conv2d(256, 8, 1))
    assert not eligible(nn.Conv2d(256, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="not a convolution Winograd"):
        Winograd3x3(nn.Conv2d(256, 8, 1))


def test_use_winograd_replaces_in_place_and_only_within():
    model = nn.Sequential(_conv(256, 256), nn.ReLU(), nn.Sequential(_conv(256, 8), _conv(8, 8)))
    x = torch.randn(1, 256, 6, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
        partial = copy.deepcopy(model)
        assert use_winograd(partial, within=[partial[0]]) == 1
        assert isinstance(partial[0], Winograd3x3) and type(partial[2][0]) is nn.Conv2d
        assert use_winograd(model) == 2
        assert isinstance(model[2][0], Winograd3x3) and type(model[2][1]) is nn.Conv2d
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_fp32_only():
    layer = Winograd3x3(_conv(256, 8))
    x = torch.randn(1, 256, 4, 4)
    with pytest.raises(TypeError, match="fp32 only"):
        layer(x.bfloat16())
    with pytest.raises(TypeError, match="fp32 only"), torch.autocast("cpu", torch.bfloat16):
        layer(x)


def _vgg19_12(size: int):
    torch.manual_seed(0)
    config = ModelConfig(backbone="vgg19", layers=VGG19_12, image_size=size)
    # VGG19 weights do not ship offline: an explicit random init, for equality only
    return config, build_extractor(config, allow_random_init=True).eval()


def test_the_backbone_replaces_only_the_layers_it_runs():
    _, ext = _vgg19_12(64)
    # relu3_2..relu3_4 and relu4_1..relu4_4 read >= 256 channels; conv5_x never runs
    assert ext.backbone.use_winograd() == 7
    kinds = [type(m).__name__ for m in ext.backbone.model.features if not isinstance(m, nn.ReLU)]
    assert kinds.count("Winograd3x3") == 7 and kinds[-5:-1] == ["Conv2d"] * 4


def test_prepared_fp32_cpu_extractor_gives_the_reference_grid():
    """The scoring actor's fp32 CPU extractor (Winograd in the wide layers) against the plain
    extractor's reference computation: the fast-path equality bound of test_fastpath."""
    config, ext = _vgg19_12(128)
    head = DFRHead(config, ext.channels, 64).eval()
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    ref = reference_error_grid(ext, head, x)
    spec = PrecisionSpec.for_device("fp32", CPU)
    prepared = prepare_extractor(copy.deepcopy(ext), CPU, spec)
    assert any(isinstance(m, Winograd3x3) for m in prepared.backbone.modules())
    xin = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got = folded_head(head, prepared).error_grid(extract_regional(prepared, xin))
    torch.testing.assert_close(got, ref, rtol=2e-5, atol=1e-6)


def test_reduced_precision_backbones_keep_their_convolutions():
    _, ext = _vgg19_12(64)
    spec = PrecisionSpec.for_device("bf16", CPU, "bf16")
    prepared = prepare_extractor(ext, CPU, spec)
    assert not any(isinstance(m, Winograd3x3) for m in prepared.backbone.modules())
