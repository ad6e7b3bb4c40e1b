"""The exact fast path equals the reference computation (fp32, to float rounding).

Reference: every layer pooled onto the grid (`FeatureExtractor`), standardised, the CAE's
nn.Module forward, squared error (`DFRHead.error_grid` / `DFRHead.forward`). Fast path: coarse
layers' first CAE layer at native resolution, BatchNorm and standardisation folded, positions in
chunks (dfr_core.fastpath), through the shared batched forward (dfr_core.inference).
"""

from __future__ import annotations

import pytest
import torch

from dfr_core import chunks
from dfr_core.chunks import chunk_rows, row_parts
from dfr_core.config import ModelConfig
from dfr_core.fastpath import (
    extract_regional,
    fast_error_grid,
    folded_head,
    pooled_means,
    reference_error_grid,
)
from dfr_core.features import regional_matrix
from dfr_core.inference import extract, forward_batch, head_output
from dfr_core.model import DFRHead, DFRModel, build_extractor
from dfr_core.precision import PrecisionSpec
from dfr_core.preprocess import normalize_batch
from dfr_core.regional_maps import row_support

VGG19_12 = (
    "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4",
    "relu4_1", "relu4_2", "relu4_3", "relu4_4",
)  # fmt: skip


def _head(config: ModelConfig, channels: int, latent: int, seed: int = 0) -> DFRHead:
    """A head with non-trivial BatchNorm statistics and feature statistics (as after training),
    so that folding them is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    head = DFRHead(config, channels, latent)
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
    head.set_feature_stats(
        torch.rand(channels, generator=gen) * 2, torch.rand(channels, generator=gen) + 0.5
    )
    return head.eval()


def _assert_close(fast: torch.Tensor, ref: torch.Tensor) -> None:
    assert fast.shape == ref.shape and fast.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(fast, ref, rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vgg19_12():
    torch.manual_seed(0)
    config = ModelConfig(backbone="vgg19", layers=VGG19_12, image_size=128)
    # VGG19 weights do not ship offline: an explicit random init, for equality only
    return config, build_extractor(config, allow_random_init=True).eval()


@pytest.fixture(scope="module")
def mobilenet():
    config = ModelConfig(image_size=256)  # the default backbone and layers, offline weights
    return config, build_extractor(config).eval()


def test_vgg19_12_error_grid_equals_reference(vgg19_12):
    config, extractor = vgg19_12
    assert extractor.channels == 3456
    head = _head(config, extractor.channels, 64)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    maps = extract_regional(extractor, x)
    assert [m.shape[-1] for m in maps.coarse] == [16]  # relu4_x: 16 x 16 under a 32 x 32 grid
    assert chunk_rows(folded_head(head, extractor).width, 32) < 32  # several chunks per image
    _assert_close(fast_error_grid(extractor, head, x), reference_error_grid(extractor, head, x))


def test_vgg19_12_in_cuda_sized_chunks_equals_reference(vgg19_12, monkeypatch):
    """On CUDA a chunk is a whole grid and a coarse map one band (fewer kernel launches): the
    same sizes forced on the CPU give the reference's numbers."""
    cuda = torch.device("cuda")  # a device object only: nothing runs on it here
    assert chunk_rows(3456, 64, cuda) >= 64 and chunks.channel_blocks(2048, cuda) == [(0, 2048)]
    assert chunks.channel_blocks(2048) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)]
    config, extractor = vgg19_12
    monkeypatch.setattr(chunks, "CHUNK_BYTES", chunks.CUDA_CHUNK_BYTES)
    monkeypatch.setattr(chunks, "BAND_CHANNELS", 1 << 20)
    head = _head(config, extractor.channels, 64)
    assert chunk_rows(folded_head(head, extractor).width, 32) >= 32  # one chunk per image
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    _assert_close(fast_error_grid(extractor, head, x), reference_error_grid(extractor, head, x))


def test_pooled_means_in_reference_channel_order(vgg19_12):
    """The global score term's input: coarse layers are regrouped in the fast path, the means
    must come back in the extractor's channel order."""
    _, extractor = vgg19_12
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = extractor(x).mean(dim=(2, 3))
    torch.testing.assert_close(pooled_means(extractor, extract_regional(extractor, x)), ref)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_maps_are_channels_last_at_the_backbone_precision(vgg19_12, dtype):
    """The head reads position rows: both map kinds are channels_last; a bf16 backbone's maps
    are stored in bf16 (the fine ones pooled at fp32 first), an fp32 backbone's in fp32."""
    _, extractor = vgg19_12
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(5))
    maps = extract_regional(extractor, x, dtype)
    for fmap in (maps.fine, *maps.coarse):
        assert fmap.dtype == (dtype or torch.float32)
        assert fmap.is_contiguous(memory_format=torch.channels_last)
    if dtype is not None:  # pooled at fp32, then rounded once to the storage precision
        ref = extract_regional(extractor, x).fine
        torch.testing.assert_close(maps.fine.float(), ref, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("n_in", [16, 32, 64, 128])
def test_row_support_is_exactly_the_nonzero_columns(n_in):
    """A band of grid rows reads native rows [k0, k1) only: the rows outside are all zero in
    the regional operator, the two ends are not."""
    mat = regional_matrix(n_in, 128, 4)
    for r0, r1 in [(0, 8), (8, 16), (24, 32), (5, 6)]:
        k0, k1 = row_support(n_in, 128, 4, r0, r1)
        band = mat[r0:r1]
        assert not band[:, :k0].any() and not band[:, k1:].any()
        assert band[:, k0].any() and band[:, k1 - 1].any()


@pytest.mark.parametrize("feature_norm", ["channel", "none"])
@pytest.mark.parametrize("chunk_bytes", [None, 4 * 232 * 64 * 5])
def test_default_backbone_outputs_equal_reference(
    mobilenet, feature_norm, chunk_bytes, monkeypatch
):
    """The default head is narrow enough for one chunk per image; a small budget forces several
    chunks of 5 grid rows (the last one shorter), which must give the same numbers."""
    config, extractor = mobilenet
    if chunk_bytes is not None:
        monkeypatch.setattr(chunks, "CHUNK_BYTES", chunk_bytes)
        assert chunk_rows(extractor.channels, 64) == 5
    config = ModelConfig(image_size=256, feature_norm=feature_norm)
    head = _head(config, extractor.channels, 40, seed=3)
    model = DFRModel(extractor, head).eval()
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 256, 256, 3), generator=gen, dtype=torch.uint8)
    with torch.no_grad():
        ref = model(normalize_batch(images))
    fast = forward_batch(model, images.numpy())
    _assert_close(fast.anomaly_map, ref.anomaly_map)
    _assert_close(fast.score, ref.score)
    sizes = [m.shape[-1] for m in extract_regional(extractor, normalize_batch(images)).coarse]
    assert sizes == [32, 16]  # features.6 at 32, features.10 and .13 share 16: one R each


def test_head_on_a_subset_of_rows_equals_whole_batch(mobilenet):
    """The scoring actor runs one backbone pass and each line's head on its own rows."""
    config, extractor = mobilenet
    head = _head(config, extractor.channels, 40, seed=4)
    x = normalize_batch(torch.randint(0, 256, (4, 256, 256, 3), dtype=torch.uint8))
    spec = PrecisionSpec()
    maps = extract(extractor, x, spec)
    whole = head_output(head, extractor, maps, spec)
    part = head_output(head, extractor, maps, spec, rows=[3, 1])
    torch.testing.assert_close(part.anomaly_map, whole.anomaly_map[[3, 1]], rtol=1e-6, atol=1e-7)


def test_folded_head_is_rebuilt_when_weights_change(mobilenet):
    config, extractor = mobilenet
    head = _head(config, extractor.channels, 16, seed=5)
    x = normalize_batch(torch.randint(0, 256, (1, 256, 256, 3), dtype=torch.uint8))
    before = folded_head(head, extractor)
    assert folded_head(head, extractor) is before  # cached while the weights stay
    with torch.no_grad():
        head.cae.decoder[-1].weight.mul_(2.0)  # an optimiser step changes weights in place
    assert folded_head(head, extractor) is not before
    _assert_close(fast_error_grid(extractor, head, x), reference_error_grid(extractor, head, x))


@pytest.mark.parametrize("backbone", ["vgg19_12", "mobilenet"])
def test_int8_head_is_the_reference_within_its_rounding(request, backbone):
    """The int8 head (dfr_core.quantized; opt-in, calibrated at int8) is the fp32 reference
    up to its quantisation (per position and per channel): the error grid within 0.1 % of its
    largest value, and not equal to it (the products really are int8)."""
    config, extractor = request.getfixturevalue(backbone)
    head = _head(config, extractor.channels, 64)
    size = config.image_size
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    ref = reference_error_grid(extractor, head, x)
    fold = folded_head(head, extractor, torch.int8)
    assert fold.int8 and fold.w_last.q.dtype == torch.int8
    got = fold.error_grid(extract_regional(extractor, x))
    assert got.shape == ref.shape and got.dtype == torch.float32
    rel = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < rel < 1e-3


def test_row_parts_cover_the_rows_in_near_equal_parts():
    assert row_parts(64, 8) == [(k * 8, k * 8 + 8) for k in range(8)]
    assert row_parts(64, 100) == [(0, 64)]
    parts = row_parts(32, 5)  # 7 parts: 4 or 5 rows, never a 2-row tail
    assert len(parts) == 7 and parts[0][0] == 0 and parts[-1][1] == 32
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))
    assert {r1 - r0 for r0, r1 in parts} == {4, 5}


def test_int8_head_in_chunks_of_any_size_gives_the_same_grid(vgg19_12, monkeypatch):
    """Every position is quantised on its own scale and its int32 products are exact, so the cut
    into chunks changes only the fp32 rounding of the regional bands (GEMMs over each chunk's
    native rows), which a requantisation can turn into a step of one int8 level somewhere: far
    below the int8 head's own 1e-3 bound against fp32. The chunks after the first reuse the
    coarse layers' first-layer rows the chunk before computed (`FoldedHead._first_rows`)."""
    config, extractor = vgg19_12
    head = _head(config, extractor.channels, 64)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    maps = extract_regional(extractor, x)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * 3456 * 32 * 32)
    assert chunk_rows(3456, 32) == 32  # the whole 32 x 32 grid at once
    whole = folded_head(head, extractor, torch.int8).error_grid(maps)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 4 * 3456 * 32 * 5)
    assert chunk_rows(3456, 32) == 5  # 7 chunks of 4-5 grid rows
    chunked = folded_head(head, extractor, torch.int8).error_grid(maps)
    assert float((chunked - whole).abs().max() / whole.abs().max()) < 1e-4  # 1.4e-7 here
