"""Input geometry: how one decoded image becomes the model inputs, and where they sit.

Torch-free on purpose (numpy + dfr_core.resize + dfr_core.config): the scoring job's decode
stage imports it to cut tiles on CPU workers that never load torch.

- Untiled model (``config.tile is None``): the image is resized (antialiased bilinear, aspect
  NOT kept) to ``config.input_hw``, N or HxW: one input, exactly as before issue 12.
- Tiled model: the image is resized by ``tile_scale`` (aspect kept; 1.0 = native resolution),
  then covered by ``tile`` x ``tile`` windows at stride ``tile - tile_overlap``; along each
  axis the origins are 0, stride, 2*stride, ... and one last window flush with the right /
  bottom edge, so every pixel is covered even when the size is not a multiple of the stride.
  An image smaller than one tile (after the scale) is refused (TOO_SMALL: padding would invent
  pixels the model never saw in training); one needing more than ``max_tiles`` windows is
  refused (TOO_MANY_TILES) before any pixel is resampled, so memory stays bounded.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

import numpy as np

from dfr_core.config import ModelConfig
from dfr_core.resize import resize_rgb_uint8, to_rgb_uint8


class GeometryReason(StrEnum):
    TOO_SMALL = "too_small"
    TOO_MANY_TILES = "too_many_tiles"


class GeometryError(ValueError):
    """An image the model's geometry cannot take; ``reason`` is the row's error_reason."""

    def __init__(self, reason: GeometryReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class TilePlan(NamedTuple):
    """Where an image's model inputs sit.

    ``height``/``width``: the original image; ``map_hw``: the stitched anomaly map's resolution
    (the scaled image for a tiled model, input_hw otherwise); ``origins``: (N, 2) int64 (top,
    left) of each tile in map coordinates; ``tile_hw``: each input's size (= input_hw).
    """

    height: int
    width: int
    map_hw: tuple[int, int]
    origins: np.ndarray
    tile_hw: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        return int(len(self.origins))


def axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Window starts along one axis: 0, stride, ... and the last flush with the far edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def scaled_size(config: ModelConfig, height: int, width: int) -> tuple[int, int]:
    """The tiled map's (H, W): the image resized by tile_scale, rounded, at least 1 px."""
    if config.tile_scale == 1.0:
        return height, width
    return max(1, round(height * config.tile_scale)), max(1, round(width * config.tile_scale))


def plan_tiles(config: ModelConfig, height: int, width: int) -> TilePlan:
    """The plan for an image of height x width (from its header: no pixels needed)."""
    if height < 1 or width < 1:
        raise GeometryError(GeometryReason.TOO_SMALL, f"image {height}x{width} has no pixels")
    if config.tile is None:
        hw = config.input_hw
        return TilePlan(height, width, hw, np.zeros((1, 2), dtype=np.int64), hw)
    tile, overlap = config.tile, config.tile_overlap
    mh, mw = scaled_size(config, height, width)
    if mh < tile or mw < tile:
        raise GeometryError(
            GeometryReason.TOO_SMALL,
            f"image {height}x{width} is smaller than the {tile} px tile after scale "
            f"{config.tile_scale} ({mh}x{mw})",
        )
    rows, cols = axis_origins(mh, tile, overlap), axis_origins(mw, tile, overlap)
    if len(rows) * len(cols) > config.max_tiles:
        raise GeometryError(
            GeometryReason.TOO_MANY_TILES,
            f"image {height}x{width} needs {len(rows)}x{len(cols)} = {len(rows) * len(cols)} "
            f"tiles of {tile} px (overlap {overlap}, scale {config.tile_scale}); the model's "
            f"max_tiles is {config.max_tiles}",
        )
    origins = np.array([(r, c) for r in rows for c in cols], dtype=np.int64).reshape(-1, 2)
    return TilePlan(height, width, (mh, mw), origins, (tile, tile))


def cut_tiles(scaled: np.ndarray, plan: TilePlan) -> np.ndarray:
    """(H, W, 3) image at map resolution -> (N, th, tw, 3) C-contiguous tiles of the plan."""
    th, tw = plan.tile_hw
    out = np.empty((plan.n_tiles, th, tw, 3), dtype=np.uint8)
    for k, (top, left) in enumerate(plan.origins.tolist()):
        out[k] = scaled[top : top + th, left : left + tw]
    return out


def prepare_image(config: ModelConfig, image: np.ndarray) -> tuple[np.ndarray, TilePlan]:
    """A decoded image (any dtype/channels, see to_rgb_uint8) -> its model inputs and plan.

    THE one preprocessing of training, calibration, evaluation, DFRModel.predict and the
    scoring job's decode stage. Untiled: ``resize_image`` to input_hw exactly as before (N = 1).
    """
    arr = np.asarray(image)
    height, width = (int(arr.shape[0]), int(arr.shape[1])) if arr.ndim >= 2 else (0, 0)
    plan = plan_tiles(config, height, width)
    rgb = to_rgb_uint8(arr)
    if config.tile is None:
        return resize_rgb_uint8(rgb, plan.tile_hw)[None], plan
    return cut_tiles(resize_rgb_uint8(rgb, plan.map_hw), plan), plan


def map_to_original(plan: TilePlan) -> tuple[int, int]:
    """The (H, W) masks and heatmaps are written at: the original image's."""
    return plan.height, plan.width


__all__ = [
    "GeometryError",
    "GeometryReason",
    "TilePlan",
    "axis_origins",
    "cut_tiles",
    "map_to_original",
    "plan_tiles",
    "prepare_image",
    "scaled_size",
]
