"""The contract of tiling (issue 12), with the real MobileNetV2: a defect smaller than the
square resize can resolve is missed by the square model and found by the tiled one.

Parts: 256 x 256 vertical stripes of period 4 px (70 / 180 grey, noise sigma 4). Defect: an
8 x 8 px patch where the stripes are replaced by their mean grey. The 4x square resize to 64 px
averages the stripes to that same grey, so the patch all but vanishes; tiles of 64 px at the
native resolution see it. Seeded and CPU-cheap (the three finest layers, 3 epochs, few tiny
images); no timing asserted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfr_core.artifact import load_model, read_metadata, save_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.geometry import prepare_image
from dfr_core.inference import forward_images
from dfr_core.model import build_extractor
from dfr_core.train import fit

TRAIN = TrainConfig(epochs=3, batch_size=4, positions_per_image=64, patience=0, seed=0)
LAYERS = ("features.1", "features.3", "features.6")


def _stripes(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    row = np.where((np.arange(256) // 2) % 2 == 0, 70.0, 180.0)
    img = np.clip(np.tile(row, (256, 1)) + rng.normal(0, 4, (256, 256)), 0, 255)
    return np.repeat(img.astype(np.uint8)[..., None], 3, axis=2)


def _defect(seed: int) -> tuple[np.ndarray, tuple[int, int]]:
    img = _stripes(seed)
    r, c = (int(v) * 4 for v in np.random.default_rng(seed + 1000).integers(8, 54, 2))
    img[r : r + 8, c : c + 8] = 125
    return img, (r, c)


def _trained(config: ModelConfig):
    torch.manual_seed(0)
    prepare = lambda images: [prepare_image(config, im) for im in images]  # noqa: E731
    model = fit(build_extractor(config), config, TRAIN, prepare(map(_stripes, range(5)))).model
    cal = calibrate(model, prepare(map(_stripes, (10, 11))), CalibrationConfig())
    normals = forward_images(model, prepare(map(_stripes, (20, 21))))
    defects = [_defect(s) for s in (20, 21)]  # the normals' twins, plus the patch
    return model, cal, normals, forward_images(model, prepare(d for d, _ in defects)), defects


@pytest.fixture(scope="module")
def tiled():
    return _trained(ModelConfig(layers=LAYERS, tile=64, global_weight=0.0))


def _near(amap: torch.Tensor, corner: tuple[int, int], scale: int) -> bool:
    """Is the map's maximum within 12 px (image pixels) of the 8 x 8 patch's centre?"""
    y, x = divmod(int(amap.argmax()), amap.shape[1])
    return abs(y * scale - (corner[0] + 4)) <= 12 and abs(x * scale - (corner[1] + 4)) <= 12


# Scores are quantile-normalised (dfr_core.scoring): 1.0 is the spread q90 -> q99.5 of normal
# images' scores, so a lift of the defect image over its defect-free twin is in those units.


def test_small_defect_found_with_tiling(tiled):
    _, cal, normals, defects, truth = tiled
    assert all(o.anomaly_map.shape == (256, 256) for o in defects)  # the image's own size
    worst_normal = max(o.score for o in normals)
    for out, twin, (_, corner) in zip(defects, normals, truth, strict=True):
        assert out.score > cal.image_threshold and out.score > worst_normal
        assert out.score - twin.score > 10.0
        assert _near(out.anomaly_map, corner, 1)  # the map points at it


def test_same_defect_missed_with_the_square_resize():
    config = ModelConfig(layers=LAYERS, image_size=64, global_weight=0.0)
    _, _, normals, defects, truth = _trained(config)
    assert all(o.anomaly_map.shape == (64, 64) for o in defects)
    for out, twin, (_, corner) in zip(defects, normals, truth, strict=True):
        assert out.score - twin.score < 1.0  # no more than normal variation
        assert not _near(out.anomaly_map, corner, 4)


def test_tiled_model_save_load_keeps_geometry_and_scores(tiled, tmp_path):
    model, cal, _, defects, truth = tiled
    save_model(model, tmp_path, cal)
    stored = read_metadata(tmp_path)["model_config"]
    assert (stored["tile"], stored["tile_overlap"], stored["image_size"]) == (64, 0, 64)
    loaded = load_model(tmp_path)
    assert loaded.model.config == model.config
    again = forward_images(loaded.model, [prepare_image(loaded.model.config, truth[0][0])])
    torch.testing.assert_close(again[0].anomaly_map, defects[0].anomaly_map)
    assert again[0].score == pytest.approx(defects[0].score, rel=1e-5)
