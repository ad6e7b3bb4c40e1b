"""Stitching (dfr_core.tiling) and the per-image forward (dfr_core.inference) of tiled models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfr_core.config import ModelConfig
from dfr_core.geometry import plan_tiles, prepare_image
from dfr_core.inference import forward_batch, forward_images
from dfr_core.model import DFRHead, DFRModel, build_extractor
from dfr_core.tiling import stitch

LAYERS = ("relu1_1", "relu2_1", "relu3_1")


def test_stitch_without_overlap_is_tiles_side_by_side():
    plan = plan_tiles(ModelConfig(tile=32), 64, 96)
    assert plan.n_tiles == 6
    tiles = torch.randn(6, 32, 32)
    out = stitch(tiles, plan)
    expected = torch.cat([torch.cat(list(tiles[r * 3 : r * 3 + 3]), dim=1) for r in range(2)])
    assert torch.equal(out, expected)


def test_stitch_with_overlap_is_the_mean_of_covering_tiles():
    plan = plan_tiles(ModelConfig(tile=32, tile_overlap=16), 32, 70)
    # origins along W: 0, 16, 32, 38 (the last flush with the edge)
    assert plan.origins[:, 1].tolist() == [0, 16, 32, 38]
    tiles = torch.stack([torch.full((32, 32), float(v)) for v in (1, 2, 3, 4)])
    out = stitch(tiles, plan)
    assert out.shape == (32, 70)
    # coverage: [0, 32), [16, 48), [32, 64), [38, 70)
    for col, value in [(0, 1.0), (20, 1.5), (35, 2.5), (40, 3.0), (50, 3.5), (65, 4.0)]:
        assert out[:, col].eq(value).all(), col
    ones = stitch(torch.ones(4, 32, 32), plan)
    assert torch.equal(ones, torch.ones(32, 70))  # a constant map stays constant


def test_stitch_rejects_wrong_tile_count():
    plan = plan_tiles(ModelConfig(tile=32), 64, 64)
    with pytest.raises(ValueError, match="expected 4 tiles"):
        stitch(torch.zeros(3, 32, 32), plan)


def _model(config: ModelConfig) -> DFRModel:
    torch.manual_seed(0)
    extractor = build_extractor(config, allow_random_init=True).eval()
    head = DFRHead(config, extractor.channels, 8).eval()
    return DFRModel(extractor, head).eval()


def test_untiled_forward_images_equals_forward_batch():
    cfg = ModelConfig(
        backbone="vgg19", layers=LAYERS, image_size=(32, 64), global_weight=0.0, score_norm="none"
    )
    model = _model(cfg)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40 + 7 * i, 90, 3), dtype=np.uint8) for i in range(3)]
    prepared = [prepare_image(cfg, img) for img in images]
    outs = forward_images(model, prepared, batch_size=2)
    ref = forward_batch(model, np.concatenate([t for t, _ in prepared[:2]]))
    assert outs[0].anomaly_map.shape == (32, 64)
    assert torch.equal(outs[1].anomaly_map, ref.anomaly_map[1].cpu())
    assert outs[1].score == float(ref.score[1])


def test_tiled_map_has_the_image_size_and_is_stitched_per_tile():
    cfg = ModelConfig(
        backbone="vgg19",
        layers=LAYERS,
        tile=32,
        tile_overlap=8,
        smoothing_sigma=0.0,
        global_weight=0.0,
        score_norm="none",
        image_score="max",
    )
    model = _model(cfg)
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (50, 77, 3), dtype=np.uint8)
    tiles, plan = prepare_image(cfg, img)
    (out,) = forward_images(model, [(tiles, plan)], batch_size=3)  # chunks cut across tiles
    assert out.anomaly_map.shape == (50, 77) and out.anomaly_map.dtype == torch.float32
    per_tile = forward_batch(model, tiles).anomaly_map  # unsmoothed (sigma 0) per-tile maps
    torch.testing.assert_close(out.anomaly_map, stitch(per_tile.cpu(), plan))
    assert out.score == pytest.approx(float(out.anomaly_map.max()))
    assert out.max_score == pytest.approx(float(out.anomaly_map.max()))


def test_model_json_without_geometry_loads_as_square_untiled(tmp_path):
    """A model.json written before issue 12 (no tile keys) keeps its meaning."""
    import json

    from dfr_core.artifact import CONFIG_FILE, load_model, save_model

    cfg = ModelConfig(backbone="vgg19", layers=LAYERS, image_size=64)
    model = _model(cfg)
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("tile", "tile_overlap", "tile_scale", "max_tiles"):
        del meta["model_config"][key]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_model(tmp_path, extractor=model.extractor).model
    assert loaded.config == cfg and loaded.config.tile is None
    assert loaded.config.input_hw == (64, 64)


def test_hxw_model_json_round_trip(tmp_path):
    from dfr_core.artifact import load_model, read_metadata, save_model

    cfg = ModelConfig(backbone="vgg19", layers=LAYERS, image_size=(32, 96))
    model = _model(cfg)
    save_model(model, tmp_path)
    assert read_metadata(tmp_path)["model_config"]["image_size"] == [32, 96]
    assert load_model(tmp_path, extractor=model.extractor).model.config.input_hw == (32, 96)


def test_fit_and_calibrate_a_non_square_model():
    """HxW end to end in dfr_core: the feature bank, the head and the maps are (H/4, W/4)."""
    from dfr_core.calibrate import calibrate
    from dfr_core.config import TrainConfig
    from dfr_core.train import fit

    cfg = ModelConfig(backbone="vgg19", layers=LAYERS, image_size=(32, 96), global_weight=0.0)
    torch.manual_seed(0)
    extractor = build_extractor(cfg, allow_random_init=True)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 120, 3), dtype=np.uint8) for _ in range(5)]
    prepared = [prepare_image(cfg, img) for img in images]
    result = fit(extractor, cfg, TrainConfig(epochs=1, patience=0), prepared[:4], prepared[4:])
    assert result.summary["cached_positions_per_image"] == 8 * 24
    cal = calibrate(result.model, prepared[4:])
    (out,) = forward_images(result.model, prepared[:1])
    assert out.anomaly_map.shape == (32, 96) and cal.n_images == 1
