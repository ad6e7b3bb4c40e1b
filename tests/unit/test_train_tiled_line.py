"""One tiled product line through the training task (no Ray: `train_line` is a plain function):
read at native resolution, train on tiles, calibrate and evaluate on stitched maps with masks
at the original size, publish a model.json that keeps the geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dfr_core.artifact import load_model
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from pipeline import registry
from pipeline.manifest import ManifestRow
from pipeline.storage import StorageOptions
from pipeline.train_task import LineTask, train_line


def _part(seed: int, h: int = 96, w: int = 160) -> np.ndarray:
    rng = np.random.default_rng(seed)
    row = np.where((np.arange(w) // 2) % 2 == 0, 70.0, 180.0)
    img = np.clip(np.tile(row, (h, 1)) + rng.normal(0, 4, (h, w)), 0, 255)
    return img.astype(np.uint8)


def _write(tmp_path: Path) -> tuple[Path, Path]:
    train, test = tmp_path / "train", tmp_path / "test_set"
    train.mkdir()
    for i in range(6):
        Image.fromarray(_part(i)).save(train / f"{i}.png")
    Image.fromarray(_part(0, 20, 20)).save(train / "tiny.png")  # smaller than a tile: skipped
    for sub in ("test/good", "test/patch", "ground_truth/patch"):
        (test / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_part(20 + i)).save(test / "test/good" / f"{i}.png")
        img, mask = _part(30 + i), np.zeros((96, 160), dtype=np.uint8)
        img[40:48, 60 + 40 * i : 68 + 40 * i] = 125
        mask[40:48, 60 + 40 * i : 68 + 40 * i] = 255
        Image.fromarray(img).save(test / "test/patch" / f"{i}.png")
        Image.fromarray(mask).save(test / "ground_truth/patch" / f"{i}_mask.png")
    return train, test


def test_tiled_line_trains_evaluates_and_publishes(tmp_path):
    train, test = _write(tmp_path)
    model = ModelConfig(layers=("features.1", "features.3"), tile=64, tile_overlap=16)
    task = LineTask(
        row=ManifestRow(line=2, product_line="p", train_uri=str(train), test_uri=str(test)),
        model=model,
        train=TrainConfig(epochs=1, positions_per_image=32),
        calibration=CalibrationConfig(),
        models_uri=str(tmp_path / "models"),
        weights_uri=None,
        storage=StorageOptions(),
        min_train_images=4,
        max_bad_fraction=0.25,
        retries=0,
        retry_delay_s=0.0,
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )
    result = train_line(task)
    assert result.status == "ok", result.error
    assert result.skipped_images == 1  # the 20 x 20 image: too_small
    metrics = result.metrics
    assert metrics["pixels_at"] == "original resolution" and metrics["n_images"] == 4
    assert metrics["pixel_auroc"] is not None and metrics["image_auroc"] is not None
    directory = registry.fetch(task.models_uri, "p", result.version, str(tmp_path / "c2"))
    loaded = load_model(directory)
    assert loaded.model.config == model and loaded.calibration is not None
    out = loaded.model.predict_images([_part(40)])[0]
    assert out.anomaly_map.shape == (96, 160)
