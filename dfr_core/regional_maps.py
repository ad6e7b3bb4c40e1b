"""One backbone pass, pooled for the fast path: `RegionalMaps` and how they are made.

The fine layers (at least as fine as the S/4 grid) are pooled onto the grid as the backbone
yields them, a band of grid rows at a time; the coarse layers are kept at native resolution,
stacked per native size, so that a head applies linear maps before the regional operator
(`dfr_core.fastpath`). Both are channels_last (position-major): the backbone's layout, so no
map is ever transposed.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

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
    coarse: dict[tuple[int, int], torch.Tensor] = {}
    start = {"fine": 0, **{hw: 0 for hw in widths}}
    # The generator's convolutions run under autocast (it resumes inside the outer context).
    # Each map goes straight into its channels of its output as it comes (no list of maps to
    # concatenate: each is freed once the next layer has read it): a fine map pooled at fp32,
    # a band of grid rows at a time (never a whole fp32 copy of a full-resolution map), a
    # coarse map copied as it is into the stack of its native size.
    with torch.no_grad(), autocast_to(x.device, autocast_dtype):
        for fmap in extractor.backbone.iter_maps(x):
            hw = (fmap.shape[-2], fmap.shape[-1])
            key = "fine" if is_fine(hw, grid) else hw
            lo = start[key]
            start[key] += fmap.shape[1]
            if key == "fine":
                with autocast_to(x.device, None):
                    _pool_into(extractor.pooling, fmap, fine[:, lo : start[key]])
                continue
            if hw not in coarse:
                coarse[hw] = _channels_last(x.shape[0], widths[hw], hw, x.device, fmap.dtype)
            coarse[hw][:, lo : start[key]].copy_(fmap)
    return RegionalMaps(fine, tuple(coarse[hw] for hw in layout.coarse_sizes))


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
