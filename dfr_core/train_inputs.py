"""What the autoencoder is fitted on, for every input geometry (issue 12).

Untiled models train on their (N, H, W, 3) inputs as before. Tiled models train on TILES: the
CAE sees tile-sized inputs at scoring time, so it is fitted on exactly those. An image of a
2k-pixel line gives tens of tiles; when all tiles of all images do not fit the feature cache
(`TrainConfig.cache_budget_mb` at `positions_per_image` cached positions per tile, fp16), or
`TrainConfig.tiles_per_image` caps them, each image contributes a seeded random sample of the
same number of tiles, so every image stays represented.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dfr_core.config import ModelConfig, TrainConfig
from dfr_core.geometry import TilePlan
from dfr_core.inference import DFRModel, iter_tile_grids
from dfr_core.scoring import ScoreTerms
from dfr_core.tiling import tiled_terms

Prepared = Sequence[tuple[np.ndarray, TilePlan]]
TrainImages = np.ndarray | Prepared


def tile_budget(channels: int, cfg: TrainConfig) -> int:
    """Most tiles whose cached features (positions_per_image positions each, fp16) fit the
    feature-cache budget."""
    return max(1, cfg.cache_budget_mb * 2**20 // (channels * cfg.positions_per_image * 2))


def sample_tiles(prepared: Prepared, budget: int, per_image: int, seed: int) -> np.ndarray:
    """All tiles of the prepared images, or the same seeded number k from each image when
    their total exceeds ``budget`` or ``per_image`` (> 0) caps them: (M, th, tw, 3) uint8."""
    counts = [len(tiles) for tiles, _ in prepared]
    k = per_image if per_image > 0 else max(counts, default=0)
    if sum(min(c, k) for c in counts) > budget:
        k = max(1, budget // max(len(prepared), 1))
    rng = np.random.default_rng(seed)
    parts = []
    for tiles, _ in prepared:
        if len(tiles) > k:
            tiles = tiles[np.sort(rng.choice(len(tiles), k, replace=False))]
        parts.append(tiles)
    return np.ascontiguousarray(np.concatenate(parts))


def model_inputs(
    images: TrainImages, model_config: ModelConfig, cfg: TrainConfig, channels: int, seed: int
) -> np.ndarray:
    """The (M, H, W, 3) uint8 inputs the feature bank is built from.

    ``images``: untiled inputs already at input_hw (an array, as before issue 12) or
    `dfr_core.geometry.prepare_image` outputs (any geometry).
    """
    if isinstance(images, np.ndarray):
        return images
    if model_config.tile is None:
        return np.concatenate([tiles for tiles, _ in images])
    return sample_tiles(images, tile_budget(channels, cfg), cfg.tiles_per_image, seed)


def count_images(images: TrainImages | None) -> int:
    return 0 if images is None else len(images)


@torch.no_grad()
def tiled_image_terms(model: DFRModel, prepared: Prepared, batch_size: int) -> list[ScoreTerms]:
    """Raw score terms of whole tiled images (stitched maps), through the fast path: the
    quantities the score scales and, later, the thresholds are set on."""
    return [
        tiled_terms(model.head, item.grids, item.pooled, item.plan)[1]
        for item in iter_tile_grids(model, prepared, batch_size)
    ]
