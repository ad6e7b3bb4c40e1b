"""Stripable blocks (`dfr_core.backbones.stripes`) give the maps the whole-map forward gives, each
row once, and the fast path pools their stripes into the same regional features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfr_core import regional_maps
from dfr_core.backbones.stripes import MapRows, block_end, run_block
from dfr_core.config import ModelConfig
from dfr_core.features import regional_matrix
from dfr_core.model import build_extractor
from dfr_core.regional_maps import extract_regional, grid_support

VGG19_12 = (
    "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4",
    "relu4_1", "relu4_2", "relu4_3", "relu4_4",
)  # fmt: skip


def _block(seed: int = 0) -> nn.Sequential:
    """Two convolutions of different kernel heights (3 and 5: halos of 1 and 2), ReLUs, a pool."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, (5, 3), padding=(2, 1)),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
    ).eval()


def _whole(block: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for step in block:
        x = step(x)
        outs.append(x.clone())
    return outs


@pytest.mark.parametrize(("height", "rows"), [(32, 8), (36, 8), (20, 32), (16, 2)])
def test_a_block_in_stripes_gives_the_whole_maps_each_row_once(height, rows):
    block = _block()
    x = torch.randn(2, 3, height, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _whole(block, x)
        pieces: list[MapRows] = []
        gen = run_block(list(block), x, rows, {1: 0, 3: 1})
        while True:
            try:
                pieces.append(next_piece(gen))
            except StopIteration as stop:
                pooled = stop.value
                break
    for layer, step in ((0, 1), (1, 3)):
        got = [p for p in pieces if p.layer == layer]
        assert [p.row0 for p in got] == list(range(0, height, rows))  # in order, no overlap
        torch.testing.assert_close(torch.cat([p.rows for p in got], dim=2), want[step])
    torch.testing.assert_close(pooled, want[-1])


def next_piece(gen) -> MapRows:  # noqa: ANN001 - a generator
    """The next stripe, copied: a consumer must use a stripe before asking for the next."""
    piece = next(gen)
    return piece._replace(rows=piece.rows.clone())


def test_a_block_needs_even_rows():
    block = _block()
    with pytest.raises(ValueError, match="even"):
        list(run_block(list(block), torch.randn(1, 3, 16, 16), 5, {}))
    with pytest.raises(ValueError, match="even"):
        list(run_block(list(block), torch.randn(1, 3, 15, 16), 4, {}))


@pytest.mark.parametrize(
    ("steps", "end"),
    [
        ([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2)], 3),
        ([nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)], 2),
        ([nn.ReLU(), nn.MaxPool2d(2, 2)], None),  # no convolution: nothing to save
        ([nn.Conv2d(3, 4, 3, padding=1, stride=2), nn.MaxPool2d(2, 2)], None),
        ([nn.Conv2d(3, 4, 3, padding=0), nn.MaxPool2d(2, 2)], None),  # not same-padded
        ([nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.MaxPool2d(2, 2)], None),
        ([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()], None),  # no pool to end it
        ([nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2, 2, ceil_mode=True)], None),
        ([nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2)], None),
        ([nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.MaxPool2d(2, 2)], None),
    ],
)
def test_which_steps_make_a_stripable_block(steps, end):
    assert block_end(steps, 0) == end


@pytest.fixture(scope="module")
def vgg19_64():
    config = ModelConfig(backbone="vgg19", layers=VGG19_12, image_size=64)
    torch.manual_seed(0)
    return build_extractor(config, allow_random_init=True).eval()


def test_vgg19_blocks_up_to_the_last_requested_layer_are_striped(vgg19_64):
    """Blocks 1-3 end in a pool before relu4_4; block 4's pool is past it, so relu4_x are whole."""
    backbone = vgg19_64.backbone
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = [m.clone() for m in backbone.iter_maps(x)]
        pieces = [MapRows(p.layer, p.row0, p.rows.clone()) for p in backbone.iter_map_rows(x, 8)]
    for k, fmap in enumerate(whole):
        got = [p for p in pieces if p.layer == k]
        striped = k < 8  # relu1_x .. relu3_x
        assert [p.row0 for p in got] == (list(range(0, fmap.shape[-2], 8)) if striped else [0])
        torch.testing.assert_close(torch.cat([p.rows for p in got], dim=2), fmap)


def test_a_backbone_without_such_blocks_gives_whole_maps():
    config = ModelConfig(backbone="mobilenet_v2", image_size=64)
    extractor = build_extractor(config, allow_random_init=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        whole = [m.clone() for m in extractor.backbone.iter_maps(x)]
        pieces = list(extractor.backbone.iter_map_rows(x, 8))
    assert [(p.layer, p.row0) for p in pieces] == [(k, 0) for k in range(len(whole))]
    for piece, fmap in zip(pieces, whole, strict=True):
        torch.testing.assert_close(piece.rows, fmap)


def test_grid_support_is_exactly_the_grid_rows_that_read_the_native_rows():
    for n_in, k0, k1 in ((128, 0, 4), (128, 30, 46), (128, 124, 128), (32, 5, 9)):
        cols = regional_matrix(n_in, 256, 4)[:, k0:k1]
        g0, g1 = grid_support(n_in, 256, 4, k0, k1)
        reads = (cols != 0).any(dim=1)
        assert reads[g0:g1].all() and not reads[:g0].any() and not reads[g1:].any()


@pytest.mark.parametrize("rows", [4, 16, 1000])
def test_striped_regional_features_equal_the_whole_maps_pooled(vgg19_64, monkeypatch, rows):
    """Stripes of 4 rows put several stripes under each grid row of relu2_x (summed into it);
    1,000 rows is one stripe per block (no summing)."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    x = x.contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(regional_maps, "STRIPE_ROWS", rows)
    striped = extract_regional(vgg19_64, x)
    with torch.no_grad():
        pooled = vgg19_64(x)  # every map whole, pooled by the reference pooling
    layout = regional_maps.channel_layout(vgg19_64)
    ref = pooled[:, layout.order[: layout.n_fine]]
    torch.testing.assert_close(striped.fine, ref, rtol=1e-5, atol=1e-6)
