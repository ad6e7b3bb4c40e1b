"""The report's pictures of large and non-square images (issue 12): thumbnails keep the aspect
and cap the long side; a heatmap reduced from the full-resolution map keeps a small hot spot
that a plain resize averages away; the model table names the input geometry."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from dfr_core.config import ModelConfig
from pipeline.output_layout import encode_heatmap_png
from pipeline.report.images import _thumbnail, shrink_heatmap
from pipeline.report.models import geometry_text


def _heatmap_rgb(height: int, width: int, spot: tuple[int, int, int]) -> np.ndarray:
    """A heatmap as the scoring job writes it: a cold map with one hot square of ``spot[2]``
    pixels at (spot[0], spot[1])."""
    amap = np.full((height, width), 0.1, np.float32)
    top, left, side = spot
    amap[top : top + side, left : left + side] = 5.0
    png = encode_heatmap_png(amap, pixel_threshold=1.0)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_thumbnail_keeps_aspect_and_caps_the_long_side():
    thumb = _thumbnail(np.zeros((500, 1250, 3), np.uint8), 256)
    assert thumb.size == (256, 102)  # 1250:500 = 2.5
    tall = _thumbnail(np.zeros((4000, 3, 3), np.uint8), 256)
    assert tall.size[1] == 256 and tall.size[0] >= 1


def test_small_hot_spot_survives_the_reduction():
    rgb = _heatmap_rgb(2400, 4000, (1000, 3001, 6))  # 6 px spot, 15x reduction
    size = (256, 154)
    hot = rgb[1002, 3003].astype(int)
    cold = rgb[0, 0].astype(int)
    kept = np.asarray(shrink_heatmap(rgb, size)).astype(int)
    plain = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR)).astype(int)
    # distance of the hottest thumbnail pixel to the hot colour: near it when kept; a plain
    # resize leaves at best a faint blend, much closer to the cold background
    best_kept = np.abs(kept - hot).sum(axis=2).min()
    best_plain = np.abs(plain - hot).sum(axis=2).min()
    assert best_kept < 0.5 * np.abs(hot - cold).sum() < best_plain
    assert kept.shape == (154, 256, 3)


def test_no_reduction_needed_is_a_plain_resize():
    rgb = _heatmap_rgb(100, 80, (10, 10, 20))
    out = shrink_heatmap(rgb, (80, 100))
    np.testing.assert_array_equal(np.asarray(out), rgb)


def test_geometry_text():
    assert geometry_text(ModelConfig(image_size=256)) == "256"
    assert geometry_text(ModelConfig(image_size=(256, 640))) == "256x640"
    tiled = ModelConfig(tile=256, tile_overlap=32)
    assert geometry_text(tiled) == "256 px tiles, overlap 32, scale 1, at most 64 tiles"
