"""The scoring job with a tiled and an HxW model (issue 12), end to end on local Ray.

Contracts checked: the job's scores equal scoring the same images directly with dfr_core
(`prepare_image` + `forward_images`), for a tiled line (images of several sizes and aspects
mixed in batches, one with more tiles than a backbone pass holds) and for a non-square HxW
line; masks and heatmaps have the original width and height (a tiled mask is exactly the
thresholded stitched map); a tiled line given a 1 x 1 image, a 4000 x 3 image and an image
beyond its tile cap gives exactly one error row each, with a clear reason.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch.nn.functional as F
from PIL import Image

from dfr_core.artifact import load_model, save_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.decode import decode_image
from dfr_core.geometry import prepare_image
from dfr_core.inference import forward_images
from dfr_core.model import build_extractor
from dfr_core.train import fit
from pipeline import outputs, registry, storage
from pipeline.demo.synthetic import render_defect, render_normal
from pipeline.score_job import ScoreJobConfig, run_score_job

pytestmark = pytest.mark.integration

LAYERS = ("features.1", "features.3")
TILED = ModelConfig(backbone="mobilenet_v2", layers=LAYERS, tile=64, tile_overlap=16, max_tiles=12)
WIDE = ModelConfig(backbone="mobilenet_v2", layers=LAYERS, image_size=(64, 96))
LINES = {"metal_plate": TILED, "woven_fabric": WIDE}
TRAIN = TrainConfig(epochs=2, batch_size=4, positions_per_image=64, patience=0)
DATE = "2024-06-01"
BATCH = 4  # a 9-tile image exceeds one backbone pass of 4 tiles: it is scored in 3 passes
#: tiled line's bad inputs: name -> ((height, width), expected reason)
BAD = {
    "one_pixel.png": ((1, 1), "too_small"),
    "long_thin.png": ((3, 4000), "too_small"),
    "beyond_cap.png": ((400, 400), "too_many_tiles"),  # 8 x 8 = 64 tiles > 12
}


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _image(line: str, i: int) -> np.ndarray:
    """Sizes and aspects that differ within a batch: square, wide, tall, exact tile, odd."""
    shapes = ((96, 96), (80, 150), (150, 72), (64, 64), (97, 131), (128, 128))
    h, w = shapes[i % len(shapes)]
    rng = np.random.default_rng(500 + i)
    side = max(h, w)
    if i % 4 == 1:
        img, _ = render_defect(line, ("spot", "scratch", "crack")[i % 3], rng, side)
    else:
        img = render_normal(line, rng, side)
    return np.ascontiguousarray(img[:h, :w])


def _train(line: str, config: ModelConfig, tmp: Path, models_uri: str) -> None:
    """A tiny model trained (on tiles, for the tiled line) and calibrated (on stitched maps)
    with dfr_core directly, from prepare_image outputs, and published to the registry."""
    normal = [
        prepare_image(config, render_normal(line, np.random.default_rng(i), 96)) for i in range(8)
    ]
    result = fit(build_extractor(config), config, TRAIN, normal[:6])
    cal = calibrate(result.model, normal[6:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    save_model(result.model, tmp / "trained" / line, cal)
    registry.publish(tmp / "trained" / line, models_uri, line)


@dataclass(frozen=True)
class Scored:
    files: dict[str, bytes]  # image_uri -> bytes
    df: pd.DataFrame
    models_uri: str
    cache_dir: Path


@pytest.fixture(scope="module")
def scored(ray_session, tmp_path_factory) -> Scored:
    tmp = tmp_path_factory.mktemp("tiled")
    models_uri = str(tmp / "models")
    for line, config in LINES.items():
        _train(line, config, tmp, models_uri)
    files: dict[str, bytes] = {}
    for line in LINES:
        for i in range(10):
            files[str(tmp / "archive" / line / f"{i:03d}.png")] = _png(_image(line, i))
    for name, (shape, _) in BAD.items():
        plain = np.full((*shape, 3), 90, np.uint8)
        files[str(tmp / "archive" / "metal_plate" / name)] = _png(plain)
    for uri, data in files.items():
        storage.write_bytes_atomic(uri, data)
    output = str(tmp / "out")
    config = ScoreJobConfig(
        models_uri=models_uri,
        input_uri=str(tmp / "archive"),
        output_uri=output,
        run_date=DATE,
        batch_size=BATCH,
        cpus_per_actor=0.5,
        max_actors=1,
        decode_cpus=0.25,
        shard_size=8,
        masks="all",
        heatmaps=True,
        cache_dir=str(tmp / "cache"),
        quiet=True,
        max_error_fraction=0.5,
    )
    run_score_job(config)
    return Scored(files, outputs.read_scores(output), models_uri, tmp / "cache")


def _direct(scored: Scored, line: str) -> dict[str, tuple]:
    """image_uri -> (ImageOutput, pixel threshold): dfr_core alone, same images."""
    version = registry.latest_version(scored.models_uri, line)
    loaded = load_model(registry.fetch(scored.models_uri, line, version, scored.cache_dir))
    uris = sorted(u for u in scored.files if f"/{line}/" in u and Path(u).name not in BAD)
    prepared = [prepare_image(LINES[line], decode_image(scored.files[u])) for u in uris]
    results = forward_images(loaded.model, prepared, batch_size=BATCH)
    return {u: (r, loaded.calibration) for u, r in zip(uris, results, strict=True)}


def test_every_image_one_row_and_bad_input_reasons(scored):
    df = scored.df
    assert len(df) == len(scored.files) and df["image_uri"].is_unique
    bad = df[df["image_uri"].map(lambda u: Path(u).name in BAD)]
    assert len(bad) == len(BAD)
    for row in bad.itertuples():
        shape, reason = BAD[Path(row.image_uri).name]
        assert row.status == "error" and row.error_reason == reason, row.error
        assert row.error.startswith(f"{reason}: ") and f"{shape[0]}x{shape[1]}" in row.error
        assert pd.isna(row.score) and pd.isna(row.mask_uri)
    ok = df[df["status"] == "ok"]
    assert len(ok) == len(df) - len(BAD)


@pytest.mark.parametrize("line", list(LINES))
def test_scores_equal_direct_dfr_core(scored, line):
    direct = _direct(scored, line)
    ok = scored.df[(scored.df["status"] == "ok") & (scored.df["product_line"] == line)]
    assert set(ok["image_uri"]) == set(direct)
    for row in ok.itertuples():
        result, cal = direct[row.image_uri]
        amap = result.anomaly_map.numpy()
        assert row.anomaly_score == pytest.approx(result.score, rel=1e-4, abs=1e-4)
        assert row.score == pytest.approx(result.max_score, rel=1e-4)
        assert bool(row.is_anomaly) == (row.anomaly_score > cal.image_threshold)
        assert row.defect_area_fraction == pytest.approx(
            (amap > cal.pixel_threshold).mean(), abs=2e-3
        )


@pytest.mark.parametrize("line", list(LINES))
def test_masks_and_heatmaps_at_the_original_size(scored, line):
    direct = _direct(scored, line)
    ok = scored.df[(scored.df["status"] == "ok") & (scored.df["product_line"] == line)]
    assert ok["mask_uri"].notna().all() and ok["heatmap_uri"].notna().all()  # --masks all
    for row in ok.itertuples():
        original = decode_image(scored.files[row.image_uri])
        assert (row.height, row.width) == original.shape[:2]
        mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row.mask_uri))))
        assert mask.shape == (row.height, row.width) and set(np.unique(mask)) <= {0, 255}
        heat = Image.open(io.BytesIO(storage.read_bytes(row.heatmap_uri)))
        assert heat.size == (row.width, row.height)
        result, cal = direct[row.image_uri]
        amap = result.anomaly_map
        if LINES[line].tile is not None:  # the stitched map is at the image's own resolution
            assert tuple(amap.shape) == (row.height, row.width)
            expected = amap.numpy() > cal.pixel_threshold
        else:  # an HxW map: upsampled bilinearly, as for square models
            assert tuple(amap.shape) == LINES[line].input_hw
            full = F.interpolate(amap[None, None], size=(row.height, row.width), mode="bilinear")
            expected = full[0, 0].numpy() > cal.pixel_threshold
        assert np.mean((mask == 255) != expected) < 1e-3
