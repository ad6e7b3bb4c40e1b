"""One backbone pass, pooled for the fast path: `RegionalMaps` and how they are made.

The fine layers (at least as fine as the S/4 grid) are pooled onto the grid as the backbone
yields them, a band of grid rows at a time; the coarse layers are kept at native resolution,
stacked per native size, so that a head applies linear maps before the regional operator
(`dfr_core.fastpath`). Both are channels_last (position-major): the backbone's layout, so no
map is ever transposed. At fp32 on the CPU the backbone's stripable early blocks run in
stripes of rows (`dfr_core.backbones.stripes`), each stripe pooled as it comes, so their
full-resolution maps are never held whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dfr_core.backbones.stripes import MapRows
from dfr_core.features import (
    FeatureExtractor,
    RegionalPooling,
    apply_regional,
    regional_matrix,
)


class RegionalMaps(NamedTuple):
    """One backbone pass, shared by every head trained on that extractor.

    ``fine``: (B, C_fine, Gh, Gw) pooled features of the layers at or finer than the grid;
    ``coarse``: per native size (h, w), the (B, c_n, h, w) maps of the layers coarser than the
    grid (mapped onto the grid band by band, never whole: see `FoldedHead.error_grid`).
    Channel order: fine layers then coarse layers grouped by native size (see
    `channel_layout`). Both are channels_last (position-major), the layout the head reads, and
    at the backbone's precision: fp32 for an fp32 backbone; under a bf16/fp16 backbone the fine
    maps are pooled at fp32 and stored at that precision (the features a reduced-precision
    backbone gives, at half the memory), and the coarse maps are kept as the backbone gave them
    (the head converts the rows each band reads to fp32).
    """

    fine: torch.Tensor
    coarse: tuple[torch.Tensor, ...]


class ChannelLayout(NamedTuple):
    """Where each backbone layer's channels go in the fast path's channel order."""

    order: torch.Tensor  # permutation: fast-path channel k is the reference's channel order[k]
    n_fine: int
    coarse_sizes: tuple[tuple[int, int], ...]  # native (h, w) of the coarse groups, in order
    coarse_widths: tuple[int, ...]  # channels per coarse group


def layer_sizes(extractor: FeatureExtractor) -> list[tuple[int, int]]:
    """Native (h, w) of each layer's map for an input of input_hw (ceil for odd strides)."""
    height, width = extractor.input_hw
    strides = [layer.stride for layer in extractor.backbone.layers]
    return [(-(-height // s), -(-width // s)) for s in strides]


def is_fine(hw: tuple[int, int], grid_hw: tuple[int, int]) -> bool:
    """A map at least as fine as the grid on both axes is pooled at once; any other stays at
    native resolution (the coarse path is exact for any linear regional operator)."""
    return hw[0] >= grid_hw[0] and hw[1] >= grid_hw[1]


def channel_layout(extractor: FeatureExtractor) -> ChannelLayout:
    grid = extractor.grid_hw
    fine: list[int] = []
    groups: dict[tuple[int, int], list[int]] = {}
    start = 0
    for layer, n in zip(extractor.backbone.layers, layer_sizes(extractor), strict=True):
        idx = list(range(start, start + layer.channels))
        start += layer.channels
        if is_fine(n, grid):
            fine += idx
        else:
            groups.setdefault(n, []).extend(idx)
    sizes = tuple(sorted(groups, reverse=True))
    order = fine + [i for n in sizes for i in groups[n]]
    widths = tuple(len(groups[n]) for n in sizes)
    return ChannelLayout(torch.tensor(order), len(fine), sizes, widths)


def pooled_means(extractor: FeatureExtractor, maps: RegionalMaps) -> torch.Tensor:
    """(B, C) position-means of the regional features, in the reference channel order.

    Equals ``extractor(x).mean(dim=(2, 3))`` (the global score term's input) without building
    the coarse layers' full (B, c, Gh, Gw) maps: the grid mean of ``Mh f Mw^T`` is
    ``ah^T f aw`` with ``ah``, ``aw`` the column means of the two axes' regional operators.
    """
    parts = [maps.fine.mean(dim=(2, 3), dtype=torch.float32)]
    pooling = extractor.pooling
    for fmap in maps.coarse:
        fmap = fmap.float()  # a bf16/fp16 backbone's maps: the means at fp32
        ah = pooling._matrix(fmap.shape[-2], fmap, 0).mean(dim=0)
        aw = pooling._matrix(fmap.shape[-1], fmap, 1).mean(dim=0)
        parts.append(torch.einsum("bchw,h,w->bc", fmap, ah, aw))
    means = torch.cat(parts, dim=1)
    out = torch.empty_like(means)
    out[:, channel_layout(extractor).order.to(means.device)] = means
    return out


def extract_regional(
    extractor: FeatureExtractor, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> RegionalMaps:
    """Run the backbone once; pool fine layers, keep coarse layers at native resolution too.

    ``autocast_dtype`` (bf16/fp16) runs the backbone convolutions under autocast; pooling always
    accumulates at fp32 (it is cheap and keeps the descriptors as exact as the maps allow). The
    returned maps are channels_last, at the backbone's precision (see `RegionalMaps`).
    """
    grid = extractor.grid_hw
    extractor.check_input(x)
    extractor.check_weights(autocast_dtype)
    layout = channel_layout(extractor)
    # pooled at fp32, stored at the backbone's precision (a bf16 backbone: bf16 features)
    dtype = autocast_dtype or torch.float32
    fine = _channels_last(x.shape[0], layout.n_fine, grid, x.device, dtype)
    widths = dict(zip(layout.coarse_sizes, layout.coarse_widths, strict=True))
    coarse: dict[tuple[int, int], torch.Tensor] = {
        hw: _channels_last(x.shape[0], widths[hw], hw, x.device, dtype) for hw in widths
    }
    places = _places(extractor, layout)
    heights = [hw[0] for hw in layer_sizes(extractor)]
    # The generator's convolutions run under autocast (it resumes inside the outer context).
    # Each map goes straight into its channels of its output as it comes (no list of maps to
    # concatenate: each is freed once the next layer has read it): a fine map pooled at fp32,
    # a band of grid rows at a time (never a whole fp32 copy of a full-resolution map), a
    # coarse map copied as it is into the stack of its native size. On the CPU at fp32 the
    # backbone's early blocks run in stripes of rows (`FeatureBackbone.iter_map_rows`), each
    # stripe pooled as it comes, so their full-resolution maps are never held whole.
    with torch.no_grad(), autocast_to(x.device, autocast_dtype):
        for piece in _pieces(extractor, x, dtype):
            key, lo, hi = places[piece.layer]
            if key == "fine":
                with autocast_to(x.device, None):
                    _pool_piece(extractor.pooling, piece, fine[:, lo:hi], heights[piece.layer])
                continue
            coarse[key][:, lo:hi].copy_(piece.rows)
    return RegionalMaps(fine, tuple(coarse[hw] for hw in layout.coarse_sizes))


def _places(
    extractor: FeatureExtractor, layout: ChannelLayout
) -> list[tuple[str | tuple[int, int], int, int]]:
    """Per requested layer: its output ("fine", or a coarse native size) and channel range."""
    start: dict[str | tuple[int, int], int] = {}
    places = []
    for layer, hw in zip(extractor.backbone.layers, layer_sizes(extractor), strict=True):
        key = "fine" if is_fine(hw, extractor.grid_hw) else hw
        lo = start.get(key, 0)
        start[key] = lo + layer.channels
        places.append((key, lo, start[key]))
    return places


#: Rows of a block's full-resolution maps computed at a time in a stripable block (fp32, CPU):
#: VGG19's relu1_x stripe at 256 px is 1 MiB (16 x 256 x 64 fp32), relu2_x's 1 MiB too, where
#: the whole maps are 16 and 8 MiB. Ad-hoc in-process A/Bs of VGG19-12's backbone (AMX dev
#: machine, stop 28), ms: 16 rows 143.0, 32 rows 140.4, 64 rows 139.6, whole maps 132.2 (each
#: stripe's convolutions reorder their weights again, and the stripes of relu2_x are summed
#: into the grid rows they share); under `dfr_core.heap.bound_heap`, whose heap keeps blocks
#: below 2.5 MiB, 16 rows peaked at 54-61 MB above the model and 32 rows at 57-66 (sampled).
STRIPE_ROWS = 16


def _pieces(extractor: FeatureExtractor, x: torch.Tensor, dtype: torch.dtype) -> Iterator[MapRows]:
    """The backbone's maps as `MapRows`: striped where that is exact and pays (fp32 on the
    CPU: partial stripes of a map pooled through the regional operator are summed into the
    grid, one more rounding than a single product, which only fp32 storage keeps within
    fp32's own rounding; a GPU holds whole maps easily and prefers fewer, larger kernels)."""
    backbone = extractor.backbone
    if dtype == torch.float32 and x.device.type == "cpu":
        rows = STRIPE_ROWS - STRIPE_ROWS % math.lcm(2, extractor.pooling.pool)
        yield from backbone.iter_map_rows(x, max(rows, math.lcm(2, extractor.pooling.pool)))
        return
    for k, fmap in enumerate(backbone.iter_maps(x)):
        yield MapRows(k, 0, fmap)


def _pool_piece(pooling: RegionalPooling, piece: MapRows, out: torch.Tensor, n_in: int) -> None:
    """Pool one stripe (or whole map) of a fine map into its channels ``out`` (B, c, Gh, Gw).

    A whole map: `_pool_into`. A stripe of a map at the input resolution, aligned to the pool:
    its own grid rows, whole. Any other stripe is added into every grid row whose regional
    window reads it (the operator is linear: the sum over stripes is the whole map's),
    ``out`` zeroed at the map's first stripe. ``n_in``: the whole map's height."""
    fmap, k0 = piece.rows, piece.row0
    k1 = k0 + fmap.shape[-2]
    if k0 == 0 and k1 == n_in:
        _pool_into(pooling, fmap, out)
        return
    p = pooling.pool
    if (n_in, fmap.shape[-1]) == pooling.input_hw and fmap.dtype == out.dtype and k0 % p == 0:
        if k1 % p == 0 or k1 == n_in:
            out[:, :, k0 // p : k1 // p].copy_(F.avg_pool2d(fmap, p, p))
            return
    # stripes share one height (`run_block`): when a map's first stripe is aligned to the pool,
    # every stripe is and none reaches here; otherwise none is, and the sums start from zero
    if k0 == 0:
        out.zero_()
    rows = fmap.float()
    g0, g1 = grid_support(n_in, pooling.input_hw[0], p, k0, k1)
    mh = pooling._matrix(n_in, rows, 0)[g0:g1, k0:k1]
    mw = pooling._matrix(fmap.shape[-1], rows, 1)
    out[:, :, g0:g1].add_(apply_regional(rows, mh, mw))


@lru_cache(maxsize=4096)
def grid_support(n_in: int, size: int, pool: int, k0: int, k1: int) -> tuple[int, int]:
    """The grid rows [g0, g1) whose regional windows read native rows [k0, k1)."""
    cols = regional_matrix(n_in, size, pool)[:, k0:k1]
    nonzero = (cols != 0).any(dim=1).nonzero().flatten()
    return int(nonzero[0]), int(nonzero[-1]) + 1


def _channels_last(
    b: int, c: int, hw: tuple[int, int], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """An uninitialised (b, c, h, w) tensor in channels_last memory."""
    return torch.empty(b, *hw, c, device=device, dtype=dtype).permute(0, 3, 1, 2)


#: Grid rows pooled at a time from a fine map: bounds the fp32 copy of its native rows (VGG19's
#: relu2_x at 256 px: 34 native rows of 128 x 128, 2.2 MiB) while each GEMM stays large. 16
#: was about 1 % faster end to end than 8 for VGG19-12 (ad-hoc in-process A/B, same bits).
POOL_ROWS = 16


def _pool_into(pooling: RegionalPooling, fmap: torch.Tensor, out: torch.Tensor) -> None:
    """Pool one fine map into ``out`` (B, c, Gh, Gw), POOL_ROWS grid rows at a time, converting
    only the native rows a band reads to fp32 (the regional operator is banded)."""
    gh = out.shape[-2]
    n_in = fmap.shape[-2]
    if (n_in, fmap.shape[-1]) == pooling.input_hw and fmap.dtype == out.dtype:
        # upsampling is the identity and nothing is converted: the whole map in one call
        # (avg_pool2d accumulates bf16/fp16 at fp32 and rounds once; windows are independent,
        # so the same bits as band by band)
        out.copy_(F.avg_pool2d(fmap, pooling.pool, pooling.pool))
        return
    for g0 in range(0, gh, POOL_ROWS):
        g1 = min(g0 + POOL_ROWS, gh)
        k0, k1 = row_support(n_in, pooling.input_hw[0], pooling.pool, g0, g1)
        rows = fmap[:, :, k0:k1]
        if (n_in, fmap.shape[-1]) == pooling.input_hw:  # a map at another precision
            out[:, :, g0:g1].copy_(F.avg_pool2d(rows.float(), pooling.pool, pooling.pool))
            continue
        rows = rows.float()
        mh = pooling._matrix(n_in, rows, 0)[g0:g1, k0:k1]
        mw = pooling._matrix(fmap.shape[-1], rows, 1)
        out[:, :, g0:g1].copy_(apply_regional(rows, mh, mw))


@lru_cache(maxsize=4096)
def row_support(n_in: int, size: int, pool: int, r0: int, r1: int) -> tuple[int, int]:
    """The native rows [k0, k1) that grid rows [r0, r1) of the regional operator read."""
    nonzero = (regional_matrix(n_in, size, pool)[r0:r1] != 0).any(dim=0).nonzero().flatten()
    return int(nonzero[0]), int(nonzero[-1]) + 1


def autocast_to(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN202
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)
