"""Real-data checks on ../shared/datasets (skipped cleanly where the datasets are absent)."""

from pathlib import Path

import numpy as np
import pytest

from dfr_core.calibrate import calibrate
from dfr_core.config import ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import evaluate
from dfr_core.model import build_extractor
from dfr_core.train import fit, holdout_split

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
DATASETS = {
    "magnetic_tile": SHARED / "magnetic_tile" / "magnetic_tile",
    "kolektorsdd": SHARED / "kolektorsdd" / "kolektorsdd",
}

pytestmark = pytest.mark.realdata


def _root(name: str) -> Path:
    root = DATASETS[name]
    if not root.is_dir():
        pytest.skip(f"real dataset {root} not present")
    return root


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_reader_finds_every_image_and_mask(name):
    train, test = list_category(_root(name))
    assert len(train) > 100
    defects = [s for s in test if s.defect != "good"]
    assert defects and all(s.mask is not None and s.mask.is_file() for s in defects)
    split = load_test(defects[:5] + [s for s in test if s.defect == "good"][:5], 128)
    assert split.images.shape == (10, 128, 128, 3) and split.images.dtype == np.uint8
    assert split.masks[:5].any(axis=(1, 2)).all() and not split.masks[5:].any()


@pytest.mark.slow
def test_small_model_localises_real_defects():
    """A short run on real magnetic-tile images must localise defects far better than chance."""
    train_paths, test = list_category(_root("magnetic_tile"))
    rng = np.random.default_rng(0)
    train = load_images(sorted(rng.choice(train_paths, 60, replace=False)), 128)
    picked = [s for s in test if s.defect in ("blowhole", "break", "crack")][:24]
    picked += [s for s in test if s.defect == "good"][:16]
    split = load_test(picked, 128)
    mcfg = ModelConfig(image_size=128)
    tcfg = TrainConfig(epochs=15, patience=0)
    tr, va = holdout_split(len(train), 0.15, 0)
    result = fit(build_extractor(mcfg), mcfg, tcfg, train[tr], train[va])
    cal = calibrate(result.model, train[va])
    ev = evaluate(result.model, split.images, split.masks, split.labels, cal)
    assert ev.pixel_auroc is not None and ev.pixel_auroc > 0.75
    assert ev.image_auroc is not None and ev.image_auroc > 0.6
    assert 0.0 <= ev.pro <= 1.0 and np.isfinite(ev.f1)
