"""Regional features at native resolution equal the reference's upsample-then-pool computation."""

import pytest
import torch

from dfr_core.features import (
    RegionalPooling,
    literal_regional_features,
    regional_matrix,
    upsample_matrix,
)


def test_upsample_matrix_matches_torch_interpolate():
    x = torch.randn(1, 1, 7, 5, dtype=torch.float64)
    ref = torch.nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=True)
    mh, mw = upsample_matrix(7, 16), upsample_matrix(5, 16)
    assert torch.allclose(mh @ x[0, 0] @ mw.T, ref[0, 0], atol=1e-12)


def test_regional_matrix_rows_are_averages():
    mat = regional_matrix(8, 64, 4)
    assert mat.shape == (16, 8)
    assert torch.allclose(mat.sum(dim=1), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_native_resolution_equals_literal(size):
    """Maps at strides 1..16 (VGG19 and MobileNetV2 cover these) against the literal version."""
    torch.manual_seed(0)
    maps = [
        torch.randn(2, c, size // s, size // s)
        for c, s in [(3, 1), (4, 2), (5, 4), (6, 8), (7, 16)]
    ]
    ours = RegionalPooling(size)(maps)
    ref = literal_regional_features(maps, size)
    assert ours.shape == ref.shape == (2, 25, size // 4, size // 4)
    # Exact up to float32 rounding (measured max abs error ~1e-6 on unit-variance inputs).
    assert (ours - ref).abs().max().item() < 1e-5


def test_pooling_rejects_bad_size():
    with pytest.raises(ValueError, match="multiple of pool"):
        RegionalPooling(30, 4)


@pytest.mark.parametrize(
    ("image_size", "hw"),
    [(64, (64, 64)), (64, (32, 16)), ((96, 160), (48, 80)), ((96, 160), (12, 20))],
)
def test_channels_last_maps_pool_as_they_are(image_size, hw):
    """The backbone's channels_last maps are pooled without an NCHW copy (two GEMMs on their
    position-major views): same values as the NCHW pooling, still channels_last."""
    pooling = RegionalPooling(image_size)
    fmap = torch.randn(2, 24, *hw, generator=torch.Generator().manual_seed(1))
    cl = fmap.contiguous(memory_format=torch.channels_last)
    ours, ref = pooling.pool_one(cl), pooling.pool_one(fmap)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
