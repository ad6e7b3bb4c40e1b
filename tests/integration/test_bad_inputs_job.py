"""The hostile corpus (tests/unit/test_bad_inputs.py) scored through the real job on S3.

Contract: each file gives exactly one row; a valid image is a scored ``ok`` row whose width and
height are the original (EXIF-oriented) size; anything else is an ``error`` row with the same
specific reason decode_image gives; no worker crashes (the job completes with every row) and
the pixel cap is the job's ``max_pixels``.
"""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from dfr_core.artifact import save_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.train import fit
from pipeline import outputs, registry, storage
from pipeline.demo.synthetic import render_normal
from pipeline.score_job import ScoreJobConfig, run_score_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

SIZE = 64
LINE = "metal_plate"
DATE = "2024-07-01"
MODEL = ModelConfig(backbone="mobilenet_v2", layers=("features.1", "features.3"), image_size=SIZE)
TRAIN = TrainConfig(epochs=2, batch_size=4, positions_per_image=64, patience=0)
N_GOOD = 6  # ordinary images beside the corpus, so hostile files share batches with good ones


def load_corpus_module() -> ModuleType:
    """The corpus lives with its unit tests; load that file by path (tests are not a package)."""
    path = Path(__file__).resolve().parents[1] / "unit" / "test_bad_inputs.py"
    spec = importlib.util.spec_from_file_location("dfr_hostile_corpus", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scored(s3_server: Any, ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One model, the corpus plus a few good images on S3, scored twice: default pixel cap and
    a 1 Mpx cap."""
    corpus = load_corpus_module().hostile_corpus()
    client = s3_server.client()
    client.create_bucket(Bucket="dfr-bad-inputs-test")
    bucket = "s3://dfr-bad-inputs-test"
    tmp = tmp_path_factory.mktemp("bad-inputs")
    normal = np.stack([render_normal(LINE, np.random.default_rng(i), SIZE) for i in range(8)])
    result = fit(build_extractor(MODEL), MODEL, TRAIN, normal[:6])
    cal = calibrate(result.model, normal[6:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    save_model(result.model, tmp / "model", cal)
    registry.publish(tmp / "model", f"{bucket}/models", LINE)
    for hostile in corpus:
        storage.write_bytes_atomic(f"{bucket}/archive/{LINE}/{hostile.name}", hostile.data)
    for i in range(N_GOOD):
        buf = io.BytesIO()
        Image.fromarray(render_normal(LINE, 100 + i, SIZE)).save(buf, format="PNG")
        storage.write_bytes_atomic(f"{bucket}/archive/{LINE}/good_{i}.png", buf.getvalue())
    runs = {}
    for label, max_pixels in (("default", None), ("capped", 1_000_000)):
        config = ScoreJobConfig(
            models_uri=f"{bucket}/models",
            input_uri=f"{bucket}/archive",
            output_uri=f"{bucket}/out-{label}",
            run_date=DATE,
            batch_size=4,
            shard_size=8,
            cpus_per_actor=0.5,
            max_actors=2,  # two actor start-ups per job, not three (the suite is CPU bound)
            decode_cpus=0.5,
            masks="all",
            cache_dir=str(tmp / "cache"),
            quiet=True,
            max_error_fraction=1.0,
        )
        if max_pixels is not None:
            config = ScoreJobConfig(**{**config.__dict__, "max_pixels": max_pixels})
        summary = run_score_job(config)
        df = outputs.read_scores(config.output_uri)
        runs[label] = (summary, df.assign(name=df["image_uri"].str.rsplit("/", n=1).str[1]))
    return {"corpus": corpus, "runs": runs, "bucket": bucket}


def test_each_file_is_one_row_with_its_status_and_reason(scored: dict) -> None:
    corpus = scored["corpus"]
    summary, df = scored["runs"]["default"]
    assert len(df) == len(corpus) + N_GOOD == summary.counts["rows"]
    assert df["name"].is_unique
    rows = df.set_index("name")
    for hostile in corpus:
        row = rows.loc[hostile.name]
        if hostile.reason is None:
            assert row["status"] == "ok", (hostile.name, row["error"])
            assert (int(row["height"]), int(row["width"])) == hostile.shape, hostile.name
            assert np.isfinite(row["score"]) and row["mask_uri"] is not None
        else:
            assert row["status"] == "error", hostile.name
            assert row["error_reason"] == hostile.reason, (hostile.name, row["error"])
            assert row["error"].startswith(f"{hostile.reason}: ")
            assert row["score"] is None or np.isnan(row["score"])
    good = df[df["name"].str.startswith("good_")]
    assert (good["status"] == "ok").all()
    expected_errors: dict[str, int] = {}
    for hostile in corpus:
        if hostile.reason is not None:
            expected_errors[hostile.reason] = expected_errors.get(hostile.reason, 0) + 1
    assert summary.counts["error_reasons"] == dict(sorted(expected_errors.items()))
    assert summary.counts["ok"] == N_GOOD + sum(h.reason is None for h in corpus)


def test_masks_are_written_at_original_size_for_valid_hostile_images(scored: dict) -> None:
    """Even 1x1 and 2000x1500 images get a mask of their own size (the upsampling path)."""
    _, df = scored["runs"]["default"]
    rows = df.set_index("name")
    for name, shape in (("one_pixel.png", (1, 1)), ("huge.png", (1500, 2000)),
                        ("exif_rotated.jpg", (64, 40))):  # fmt: skip
        mask = Image.open(io.BytesIO(storage.read_bytes(rows.loc[name, "mask_uri"])))
        assert (mask.height, mask.width) == shape, name


def test_pixel_cap_is_the_jobs_max_pixels(scored: dict) -> None:
    _, default = scored["runs"]["default"]
    summary, capped = scored["runs"]["capped"]
    assert len(capped) == len(default)
    changed = capped.set_index("name")["error_reason"].fillna("ok") != default.set_index("name")[
        "error_reason"
    ].fillna("ok")
    assert sorted(changed[changed].index) == ["huge.png"]
    assert capped.set_index("name").loc["huge.png", "error_reason"] == "too_large"
    assert summary.counts["error_reasons"]["too_large"] == 2  # the bomb and huge.png
