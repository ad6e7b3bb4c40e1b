"""Input geometry (dfr_core.geometry): tile plans, their errors, and the config fields."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dfr_core.config import ModelConfig, from_dict, parse_size, to_dict
from dfr_core.geometry import (
    GeometryError,
    GeometryReason,
    axis_origins,
    map_to_original,
    plan_tiles,
    prepare_image,
)
from dfr_core.resize import resize_image

TILED = ModelConfig(tile=64, tile_overlap=16, max_tiles=64)


@pytest.mark.parametrize(
    ("length", "tile", "overlap"),
    [(64, 64, 0), (200, 64, 0), (201, 64, 16), (130, 64, 63), (1000, 256, 32)],
)
def test_tiles_cover_every_pixel_and_end_flush(length, tile, overlap):
    starts = axis_origins(length, tile, overlap)
    covered = np.zeros(length, dtype=int)
    for s in starts:
        covered[s : s + tile] += 1
    assert covered.min() >= 1 and starts[0] == 0 and starts[-1] == length - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_plan_covers_right_and_bottom_edges_of_odd_sizes():
    plan = plan_tiles(TILED, 150, 201)
    assert plan.map_hw == (150, 201) and plan.tile_hw == (64, 64)
    cover = np.zeros(plan.map_hw, dtype=int)
    for top, left in plan.origins:
        cover[top : top + 64, left : left + 64] += 1
    assert cover.min() >= 1
    assert plan.origins[:, 0].max() == 150 - 64 and plan.origins[:, 1].max() == 201 - 64
    assert map_to_original(plan) == (150, 201)


def test_plan_with_scale_is_in_scaled_coordinates():
    cfg = ModelConfig(tile=64, tile_scale=0.5)
    plan = plan_tiles(cfg, 256, 300)
    assert plan.map_hw == (128, 150) and (plan.height, plan.width) == (256, 300)
    assert plan.origins.dtype == np.int64 and plan.origins.shape == (6, 2)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (4000, 3), (3, 4000), (63, 500)])
def test_too_small_images_are_refused_with_the_sizes(h, w):
    with pytest.raises(GeometryError) as err:
        plan_tiles(TILED, h, w)
    assert err.value.reason is GeometryReason.TOO_SMALL and str(err.value.reason) == "too_small"
    assert f"{h}x{w}" in str(err.value) and "64 px tile" in str(err.value)


def test_too_many_tiles_is_refused_before_any_pixel():
    cfg = ModelConfig(tile=64, max_tiles=4)
    assert plan_tiles(cfg, 128, 128).n_tiles == 4
    with pytest.raises(GeometryError) as err:
        plan_tiles(cfg, 10_000, 10_000)
    assert err.value.reason is GeometryReason.TOO_MANY_TILES and "max_tiles is 4" in str(err.value)


def test_prepare_image_untiled_is_todays_resize():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 130, 3), dtype=np.uint8)
    for size in (64, (64, 160)):
        cfg = ModelConfig(image_size=size)
        tiles, plan = prepare_image(cfg, img)
        np.testing.assert_array_equal(tiles[0], resize_image(img, size))
        assert tiles.shape[0] == 1 and plan.map_hw == cfg.input_hw
        assert (plan.height, plan.width) == (90, 130)


def test_prepare_image_tiles_are_windows_of_the_image():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (100, 150), dtype=np.uint8)  # grayscale: to_rgb_uint8 first
    tiles, plan = prepare_image(TILED, img)
    assert tiles.shape == (plan.n_tiles, 64, 64, 3) and tiles.flags["C_CONTIGUOUS"]
    for tile, (top, left) in zip(tiles, plan.origins, strict=True):
        np.testing.assert_array_equal(tile[..., 0], img[top : top + 64, left : left + 64])


def test_config_geometry_fields_validate_and_round_trip():
    assert ModelConfig(image_size=(256, 640)).input_hw == (256, 640)
    assert ModelConfig(image_size=[128, 128]).image_size == 128  # square stays an int
    assert ModelConfig(tile=128).image_size == 128 and ModelConfig(tile=128).input_hw == (128, 128)
    for bad, match in [
        (dict(image_size=(256, 100)), "multiple of 32"),
        (dict(tile=100), "tile must be a multiple of 32"),
        (dict(tile=128, tile_overlap=128), "tile_overlap must be"),
        (dict(tile=128, image_size=64), "image_size must be left at its default or equal tile"),
        (dict(tile=128, max_tiles=0), "max_tiles"),
    ]:
        with pytest.raises(ValueError, match=match):
            ModelConfig(**bad)
    cfg = ModelConfig(image_size=(256, 640))
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    tiled = ModelConfig(tile=64, tile_overlap=8, tile_scale=0.5, max_tiles=9)
    assert from_dict(ModelConfig, to_dict(tiled)) == tiled


def test_parse_size():
    assert parse_size("256") == 256 and parse_size("256x640") == (256, 640)
    assert parse_size(" 64X96 ") == (64, 96)
    for bad in ("abc", "1x2x3", "x"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_geometry_imports_no_torch():
    code = "import sys, dfr_core.geometry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
