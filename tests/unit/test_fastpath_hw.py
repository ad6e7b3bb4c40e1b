"""Non-square (H x W) input: the fast path still equals the reference computation.

The reference pools every layer onto the (H/4, W/4) grid (`FeatureExtractor`) and runs the
head's nn.Module forward; the fast path keeps coarse layers at native (h, w) and maps them
band by band with one regional matrix per axis (dfr_core.fastpath).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfr_core.config import ModelConfig
from dfr_core.fastpath import extract_regional, fast_error_grid, pooled_means, reference_error_grid
from dfr_core.features import RegionalPooling, literal_regional_features
from dfr_core.inference import forward_batch
from dfr_core.model import DFRHead, DFRModel, build_extractor
from dfr_core.preprocess import normalize_batch
from dfr_core.resize import resize_image


def _head(config: ModelConfig, channels: int, latent: int, seed: int = 0) -> DFRHead:
    gen = torch.Generator().manual_seed(seed)
    head = DFRHead(config, channels, latent)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
    head.set_feature_stats(
        torch.rand(channels, generator=gen) * 2, torch.rand(channels, generator=gen) + 0.5
    )
    if config.global_weight > 0:
        head.set_global_gaussian(torch.rand(channels, generator=gen), torch.eye(channels) * 0.5)
        head.set_score_scales(torch.tensor([0.1, 0.9]), torch.tensor([1.0, 3.0]))
    return head.eval()


def test_regional_pooling_non_square_equals_literal():
    torch.manual_seed(0)
    h, w = 64, 160
    maps = [torch.randn(2, c, -(-h // s), -(-w // s)) for c, s in [(3, 1), (4, 2), (6, 8), (7, 32)]]
    ours = RegionalPooling((h, w))(maps)
    ref = literal_regional_features(maps, (h, w))
    assert ours.shape == ref.shape == (2, 20, 16, 40)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def mobilenet_hw():
    config = ModelConfig(image_size=(96, 224), global_weight=1.0)
    return config, build_extractor(config).eval()


def test_mobilenet_non_square_outputs_equal_reference(mobilenet_hw):
    config, extractor = mobilenet_hw
    assert extractor.grid_hw == (24, 56)
    head = _head(config, extractor.channels, 24, seed=3)
    model = DFRModel(extractor, head).eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 96, 224, 3), generator=gen, dtype=torch.uint8)
    x = normalize_batch(images)
    sizes = [tuple(m.shape[-2:]) for m in extract_regional(extractor, x).coarse]
    assert sizes == [(12, 28), (6, 14)]  # coarse layers kept at native, non-square resolution
    torch.testing.assert_close(
        fast_error_grid(extractor, head, x), reference_error_grid(extractor, head, x),
        rtol=2e-5, atol=1e-6,
    )  # fmt: skip
    with torch.no_grad():
        ref = model(x)
        means = extractor(x).mean(dim=(2, 3))
    torch.testing.assert_close(pooled_means(extractor, extract_regional(extractor, x)), means)
    fast = forward_batch(model, images.numpy())
    assert fast.anomaly_map.shape == (2, 96, 224)
    torch.testing.assert_close(fast.anomaly_map, ref.anomaly_map, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(fast.score, ref.score, rtol=2e-5, atol=1e-6)


def test_vgg_non_square_with_odd_native_sizes_equals_reference():
    """224 / 16 = 14, 96 / 8 = 12 ...; 160 x 96 with VGG's 1/8 layer under a 20 x 12... grid."""
    config = ModelConfig(backbone="vgg19", layers=("relu1_1", "relu3_1", "relu4_1"),
                         image_size=(160, 96))  # fmt: skip
    torch.manual_seed(0)
    extractor = build_extractor(config, allow_random_init=True).eval()
    head = _head(config, extractor.channels, 16, seed=1)
    x = torch.randn(2, 3, 160, 96, generator=torch.Generator().manual_seed(1))
    maps = extract_regional(extractor, x)
    assert [tuple(m.shape[-2:]) for m in maps.coarse] == [(20, 12)]
    torch.testing.assert_close(
        fast_error_grid(extractor, head, x), reference_error_grid(extractor, head, x),
        rtol=2e-5, atol=1e-6,
    )  # fmt: skip


def test_predict_resizes_to_hw(mobilenet_hw):
    config, extractor = mobilenet_hw
    model = DFRModel(extractor, _head(config, extractor.channels, 8)).eval()
    img = np.random.default_rng(0).integers(0, 255, (50, 140, 3), dtype=np.uint8)
    out = model.predict([img])
    ref = forward_batch(model, resize_image(img, (96, 224))[None])
    assert out.anomaly_map.shape == (1, 96, 224)
    assert torch.equal(out.anomaly_map, ref.anomaly_map.cpu())
