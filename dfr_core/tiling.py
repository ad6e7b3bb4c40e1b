"""Stitching per-tile error maps into one image map, and a tiled image's score.

The order of operations is what makes a tiled map mean the same as an untiled one: each tile's
error grid is upsampled to the tile (bilinear, NOT smoothed), the tiles are stitched into one
map at the scaled image's resolution, and only then is the map smoothed (once, with the model's
smoothing_sigma, in pixels of that map) and aggregated into the image score. Smoothing per tile
would blur towards a tile's border differently from its interior and leave seams.

Overlaps combine by the MEAN of the tiles covering a pixel: every tile's estimate counts the
same, and where tiles do not overlap the stitched map is the tiles placed side by side, exactly.

Global term of a tiled model: the Gaussian was fitted on training TILES' pooled features, so
each tile gets its Mahalanobis distance and the image's global term is the MAX over its tiles
(a defect confined to one tile raises that tile's distance; a mean over a 2k image's 64 tiles
would dilute it 64-fold).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

from dfr_core.geometry import TilePlan
from dfr_core.scoring import ScoreTerms


class ImageOutput(NamedTuple):
    """One image's result: ``anomaly_map`` (map_hw, fp32, CPU: stitched, then smoothed once;
    the pixel threshold applies to it), ``score`` (the image score the image threshold applies
    to), ``max_score`` (the max of the map)."""

    anomaly_map: torch.Tensor
    score: float
    max_score: float


class TiledHead(Protocol):
    """What scoring a tiled image needs of a head (dfr_core.model.DFRHead)."""

    def upsample_grid(self, grid: torch.Tensor) -> torch.Tensor: ...

    def global_distance(self, pooled_feats: torch.Tensor | None) -> torch.Tensor | None: ...

    def map_terms(
        self, full: torch.Tensor, distance: torch.Tensor | None
    ) -> tuple[torch.Tensor, ScoreTerms]: ...

    def combine(self, terms: ScoreTerms) -> torch.Tensor: ...


def stitch(tile_maps: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """(N, th, tw) per-tile maps -> the (H, W) = plan.map_hw map; overlaps are averaged."""
    th, tw = plan.tile_hw
    if tuple(tile_maps.shape) != (plan.n_tiles, th, tw):
        raise ValueError(
            f"stitch: expected {plan.n_tiles} tiles of {th}x{tw}, got {tuple(tile_maps.shape)}"
        )
    total = tile_maps.new_zeros(plan.map_hw)
    count = tile_maps.new_zeros(plan.map_hw)
    for k, (top, left) in enumerate(plan.origins.tolist()):
        total[top : top + th, left : left + tw] += tile_maps[k]
        count[top : top + th, left : left + tw] += 1.0
    if bool((count == 0).any()):
        raise ValueError("stitch: the plan's tiles leave pixels uncovered")
    return total / count


def tiled_terms(
    head: TiledHead, grids: torch.Tensor, pooled: torch.Tensor | None, plan: TilePlan
) -> tuple[torch.Tensor, ScoreTerms]:
    """One tiled image's (N, Gh, Gw) error grids (and (N, C) pooled raw features when the model
    has a global term) -> its stitched, smoothed (1, H, W) map and raw score terms (see the
    module docstring)."""
    tiles = head.upsample_grid(grids.float())
    full = stitch(tiles, plan)[None]
    distance = head.global_distance(pooled)
    if distance is not None:
        distance = distance.amax().reshape(1)
    return head.map_terms(full, distance)


def tiled_image_output(
    head: TiledHead, grids: torch.Tensor, pooled: torch.Tensor | None, plan: TilePlan
) -> ImageOutput:
    """`tiled_terms`, normalised and fused into the image score."""
    amap, terms = tiled_terms(head, grids, pooled, plan)
    score = head.combine(terms)
    return ImageOutput(amap[0].float().cpu(), float(score[0]), float(terms.max_score[0]))
