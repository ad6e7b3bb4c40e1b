"""Security contracts of the jobs: names from data never escape their prefix, credentials never
reach an output, and jobs write only under the configured model and output prefixes.

Product lines and image ids come from listings, manifests and file names, i.e. from whoever
controls the data; the secret used here is conftest's fake ``AWS_SECRET_ACCESS_KEY``, which every
client in the test process, its Ray workers and subprocesses actually signs requests with.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dfr_core.artifact import save_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.train import fit
from pipeline import outputs, registry, storage
from pipeline.demo.synthetic import SyntheticSpec, render_normal, write_mvtec_dataset
from pipeline.listing import INVALID_LINE
from pipeline.manifest import ManifestCheck, ManifestError, load_manifest
from pipeline.score_job import ScoreJobConfig, run_score_job
from pipeline.train_job import ERROR, OK, TrainJobConfig, run_train_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SIZE = 64
LINE = "metal_plate"
DATE = "2024-08-01"
SECRET = "testing-secret-never-logged"
MODEL = ModelConfig(backbone="mobilenet_v2", layers=("features.1", "features.3"), image_size=SIZE)
TRAIN = TrainConfig(epochs=2, batch_size=4, positions_per_image=64, patience=0)

#: Hostile path components: parent references, absolute paths, separators of both kinds and
#: their URL-encoded forms (which a later decode could turn into separators).
TRAVERSAL_NAMES: tuple[str, ...] = (
    "..",
    ".",
    "../escape",
    "../../etc/passwd",
    "/abs",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "..\\escape",
    "a%2Fb",
    "..%2Fescape",
    "%2e%2e",
    "%2e%2e%2fescape",
    "a%5Cb",
    "",
)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _publish_model(models_uri: str, workdir: Path) -> None:
    normal = np.stack([render_normal(LINE, np.random.default_rng(i), SIZE) for i in range(8)])
    result = fit(build_extractor(MODEL), MODEL, TRAIN, normal[:6])
    cal = calibrate(result.model, normal[6:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    save_model(result.model, workdir / LINE, cal)
    registry.publish(workdir / LINE, models_uri, LINE)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", [n for n in TRAVERSAL_NAMES if n])
def test_key_builders_refuse_traversal(name: str, tmp_path: Path) -> None:
    """Every function that turns a data-derived name into a key refuses a hostile one."""
    out, models = str(tmp_path / "out"), str(tmp_path / "models")
    with pytest.raises(ValueError, match="unsafe"):
        storage.join_uri(out, name)
    with pytest.raises(ValueError, match="unsafe"):
        outputs.mask_uri(out, DATE, name, "img")
    if name not in (".", ".."):  # "..png" and "...png" are ordinary file names
        with pytest.raises(ValueError, match="unsafe"):
            outputs.mask_uri(out, DATE, LINE, name)
    with pytest.raises(ValueError, match="unsafe"):
        outputs.shard_file_uri(out, DATE, name, 0, "key")
    with pytest.raises(ValueError):
        registry.version_uri(models, name, "20240101T000000Z-abcdef")
    with pytest.raises(ValueError):
        registry.version_uri(models, LINE, name)
    with pytest.raises(ValueError, match="unsafe"):
        ScoreJobConfig(models_uri=models, input_uri=out, output_uri=out, run_date=DATE,
                       products=(name,))  # fmt: skip
    assert not (tmp_path / "out").exists() and not (tmp_path / "models").exists()


def test_manifest_product_names_cannot_escape(tmp_path: Path) -> None:
    """Each hostile product line is a problem naming its line and column; nothing is written."""
    images = tmp_path / "images"
    for i in range(4):
        (images / f"{i}.png").parent.mkdir(parents=True, exist_ok=True)
        (images / f"{i}.png").write_bytes(_png(render_normal(LINE, i, SIZE)))
    hostile = [n for n in TRAVERSAL_NAMES if n and "," not in n]
    manifest = tmp_path / "manifest.csv"
    rows = "".join(f"{name},{images}\n" for name in hostile)
    manifest.write_text("product_line,train_uri\n" + rows)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(manifest), ManifestCheck(check_data=False))
    problems = info.value.problems
    assert [(p.line, p.column) for p in problems] == [
        (i + 2, "product_line") for i in range(len(hostile))
    ]
    for problem, name in zip(problems, hostile, strict=True):
        assert str(problem).startswith(f"line {problem.line}, column 'product_line': ")
        assert repr(name) in str(problem) or name in str(problem)
    config = TrainJobConfig(manifest_uri=str(manifest), models_uri=str(tmp_path / "models"))
    with pytest.raises(ManifestError):
        run_train_job(config)
    assert not (tmp_path / "models").exists()
    assert _tree(tmp_path) == [f"images/{i}.png" for i in range(4)] + ["manifest.csv"]


@pytest.mark.slow
def test_listing_names_cannot_escape_the_output(
    s3_bucket: str, ray_session: Any, tmp_path: Path
) -> None:
    """Hostile product_line and image_id values in a listing are error rows; every file the job
    writes lies under the output root, at the depth the layout defines."""
    models = f"{s3_bucket}/models"
    _publish_model(models, tmp_path / "trained")
    image = f"{s3_bucket}/images/good.png"
    storage.write_bytes_atomic(image, _png(render_normal(LINE, 1, SIZE)))
    sandbox = tmp_path / "sandbox"
    out = sandbox / "out"
    listing_rows = [("good", LINE)]
    for i, name in enumerate(n for n in TRAVERSAL_NAMES if n):
        listing_rows.append((name, LINE))  # hostile image id
        listing_rows.append((f"id{i}", name))  # hostile product line
    table = pa.table(
        {
            "image_uri": [image] * len(listing_rows),
            "image_id": [r[0] for r in listing_rows],
            "product_line": [r[1] for r in listing_rows],
        }
    )
    listing = tmp_path / "listing.parquet"
    pq.write_table(table, listing)
    config = ScoreJobConfig(
        models_uri=models,
        input_uri=str(listing),
        output_uri=str(out),
        run_date=DATE,
        batch_size=8,
        cpus_per_actor=0.5,
        max_actors=2,  # two actor start-ups per job, not three (the suite is CPU bound)
        decode_cpus=0.5,
        masks="all",
        heatmaps=True,
        cache_dir=str(tmp_path / "cache"),
        quiet=True,
        max_error_fraction=1.0,
    )
    summary = run_score_job(config)

    assert summary.counts["rows"] == len(listing_rows)
    assert summary.counts["ok"] == 1
    n_hostile = len(listing_rows) - 1
    assert summary.counts["error_reasons"] == {
        "bad_image_id": n_hostile // 2,
        "bad_product_line": n_hostile // 2,
    }
    df = outputs.read_scores(str(out))
    assert len(df) == len(listing_rows)
    assert set(df["product_line"]) == {LINE, INVALID_LINE}
    # Every file is inside out/, and its path has only layout components (no '..', no '%').
    assert sorted(p.name for p in sandbox.iterdir()) == ["out"]
    for rel in _tree(out):
        parts = rel.split(os.sep)
        assert parts[0] in {"scores", "masks", "_shards", "runs", "drift"}, rel  # drift: #15
        assert all(p not in ("", ".", "..") and "%" not in p and "\\" not in p for p in parts)
    masks = [rel for rel in _tree(out) if rel.startswith("masks")]
    assert masks == [
        f"masks/run_date={DATE}/product_line={LINE}/good.heatmap.png",
        f"masks/run_date={DATE}/product_line={LINE}/good.png",
    ]


def _bucket_objects(s3_server: Any, bucket: str) -> dict[str, bytes]:
    client = s3_server.client()
    name = bucket.removeprefix("s3://")
    objects: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            objects[obj["Key"]] = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
    return objects


@pytest.mark.slow
def test_no_secret_in_any_output_and_writes_confined(
    s3_server: Any,
    s3_bucket: str,
    ray_session: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Train (one good line, one failing line) and score (with not-found, undecodable and
    unsafe-id rows, whose error messages carry URIs) on S3; then scan every object in the
    bucket, the local cache, the captured logs and the Ray session's logs for the secret, and
    check that each object the jobs wrote is under the models or output prefix."""
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET
    caplog.set_level(logging.DEBUG, logger="pipeline")
    caplog.set_level(logging.INFO)
    spec = SyntheticSpec(
        product_lines=(LINE,), n_train=6, n_test_good=1, n_test_defect=1, size=SIZE
    )
    write_mvtec_dataset(tmp_path / "data", spec)
    inputs: set[str] = set()

    def put(uri: str, data: bytes) -> None:
        storage.write_bytes_atomic(uri, data)
        inputs.add(uri.removeprefix(s3_bucket + "/"))

    for path in sorted((tmp_path / "data" / LINE / "train" / "good").glob("*.png")):
        put(f"{s3_bucket}/in/train/{path.name}", path.read_bytes())
    for i in range(4):
        put(f"{s3_bucket}/in/broken/{i}.png", b"not an image")
    manifest = f"{s3_bucket}/in/manifest.csv"
    put(manifest, f"product_line,train_uri\n{LINE},{s3_bucket}/in/train\n"
        f"broken,{s3_bucket}/in/broken\n".encode())  # fmt: skip
    models = f"{s3_bucket}/ml/models"
    output = f"{s3_bucket}/ml/scores-out"
    cache = tmp_path / "cache"

    trained = run_train_job(
        TrainJobConfig(
            manifest_uri=manifest,
            models_uri=models,
            epochs=2,
            image_size=SIZE,
            cpus_per_task=0.5,
            retry_delay_s=0.0,
            progress_interval_s=0.0,
            cache_dir=str(cache),
        ),
        echo=logging.getLogger("pipeline.test").info,
    )
    assert [r.status for r in trained.results] == [OK, ERROR]

    for i in range(5):
        put(f"{s3_bucket}/in/score/{LINE}/{i}.png", _png(render_normal(LINE, 50 + i, SIZE)))
    put(f"{s3_bucket}/in/score/{LINE}/corrupt.png", b"\x89PNG\r\n\x1a\n truncated")
    listing_rows = [f"{s3_bucket}/in/score/{LINE}/{i}.png,{LINE}," for i in range(5)]
    listing_rows += [
        f"{s3_bucket}/in/score/{LINE}/corrupt.png,{LINE},",
        f"{s3_bucket}/in/score/{LINE}/missing.png,{LINE},",
        f"{s3_bucket}/in/score/{LINE}/0.png,{LINE},../../escape",
        f"{s3_bucket}/in/score/broken/0.png,broken,",
    ]
    listing = f"{s3_bucket}/in/listing.csv"
    put(listing, ("image_uri,product_line,image_id\n" + "\n".join(listing_rows) + "\n").encode())
    summary = run_score_job(
        ScoreJobConfig(
            models_uri=models,
            input_uri=listing,
            output_uri=output,
            run_date=DATE,
            batch_size=4,
            cpus_per_actor=0.5,
            max_actors=2,  # two actor start-ups per job, not three (the suite is CPU bound)
            decode_cpus=0.5,
            masks="all",
            heatmaps=True,
            cache_dir=str(cache),
            quiet=True,
            max_error_fraction=1.0,
        )
    )
    assert summary.counts["rows"] == len(listing_rows)
    assert summary.counts["error_reasons"] == {
        "bad_image_id": 1,
        "no_model": 1,
        "not_found": 1,
        "truncated": 1,
    }
    df = outputs.read_scores(output)
    bucket_name = s3_bucket.removeprefix("s3://")
    assert df["error"].str.contains(bucket_name, regex=False).any()  # messages carry locations

    secret = SECRET.encode()
    objects = _bucket_objects(s3_server, s3_bucket)
    leaks = [key for key, data in objects.items() if secret in data]
    for path in cache.rglob("*"):
        if path.is_file() and secret in path.read_bytes():
            leaks.append(str(path))
    session_dir = Path(ray_session.address_info["session_dir"])
    for path in (session_dir / "logs").rglob("*"):
        if path.is_file() and secret in path.read_bytes():
            leaks.append(str(path))
    captured = capfd.readouterr()
    for label, text in (("log", caplog.text), ("stdout", captured.out), ("stderr", captured.err)):
        if SECRET in text:
            leaks.append(label)
    assert leaks == []

    written = sorted(set(objects) - inputs)
    assert written, "the jobs wrote nothing?"
    outside = [k for k in written if not k.startswith(("ml/models/", "ml/scores-out/"))]
    assert outside == []
    assert any(k.endswith(".parquet") for k in written)
    assert any(k.endswith("model.json") for k in written)
    assert any(k.startswith("ml/scores-out/runs/") for k in written)
