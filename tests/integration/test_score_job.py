"""The scoring job end to end: local Ray, the moto S3 server, two trained product lines.

Contracts checked: every input leaves exactly one row; scores and masks equal scoring the same
images directly with dfr_core; masks exist exactly for the rows naming them; the files have the
documented schema; bad files are error rows; a rerun adds nothing; an interrupted run resumed
ends with one row per image; readers see only committed runs; pandas/DuckDB queries work.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from dfr_core.artifact import load_model, save_model
from dfr_core.calibrate import calibrate, compute_maps
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.preprocess import resize_image
from dfr_core.train import fit
from pipeline import outputs, registry, storage
from pipeline.imageio import decode_image
from pipeline.score_cli import nightly, score
from pipeline.score_job import RunInterrupted, ScoreJobConfig, run_score_job
from pipeline.synthetic import render_defect, render_normal

pytestmark = pytest.mark.integration

SIZE = 64
LINES = ("metal_plate", "woven_fabric")
NO_MODEL_LINE = "wood_panel"
PER_LINE = 110
MODEL = ModelConfig(backbone="mobilenet_v2", layers=("features.1", "features.3"), image_size=SIZE)
TRAIN = TrainConfig(epochs=2, batch_size=4, positions_per_image=64, patience=0)
DATE = "2024-05-01"
BAD_FILES = {  # name -> (bytes, expected error reason)
    "zero.png": (b"", "empty_file"),
    "notes.png": (b"this is not an image", "not_an_image"),
    "icon.pcx": (None, "unsupported_format"),  # a format Pillow knows but we do not accept
    "cut.png": (None, "truncated"),
}


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _image(line: str, i: int) -> np.ndarray:
    """Varied sizes and layouts: squares, non-squares, and some grayscale images."""
    size = (64, 80, 96)[i % 3]
    rng = np.random.default_rng(1000 + i)
    if i % 5 == 0:
        img, _ = render_defect(line, ("spot", "scratch", "crack")[i % 3], rng, size)
    else:
        img = render_normal(line, rng, size)
    if i % 7 == 0:
        img = img[:, : size * 3 // 4]  # non-square
    if i % 11 == 0:
        img = img.mean(axis=2).astype(np.uint8)  # grayscale
    return img


@dataclass(frozen=True)
class World:
    bucket: str  # s3://...
    models_uri: str  # S3 registry
    local_archive: Path  # <archive>/<line>/<file>, same files as on S3
    s3_archive: str
    listing_uri: str  # Parquet listing on S3 of every archive file, plus listing-only rows
    cache_dir: Path
    images: dict[str, bytes]  # image_uri (S3) -> bytes, for images that exist
    expected_errors: dict[str, str]  # image_uri (S3) -> reason
    listing_rows: int


@pytest.fixture(scope="module")
def world(s3_server, ray_session, tmp_path_factory) -> World:
    """Two trained lines published to an S3 registry; an archive on S3 and on local disk."""
    client = s3_server.client()
    bucket_name = "dfr-score-job-test"
    client.create_bucket(Bucket=bucket_name)
    bucket = f"s3://{bucket_name}"
    tmp = tmp_path_factory.mktemp("world")
    models_uri = f"{bucket}/models"
    for line in LINES:
        normal = np.stack([render_normal(line, np.random.default_rng(i), SIZE) for i in range(8)])
        result = fit(build_extractor(MODEL), MODEL, TRAIN, normal[:6])
        cal = calibrate(result.model, normal[6:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
        save_model(result.model, tmp / "trained" / line, cal)
        registry.publish(tmp / "trained" / line, models_uri, line)

    files: dict[str, bytes] = {}
    errors: dict[str, str] = {}
    for line in LINES:
        for i in range(PER_LINE):
            files[f"{line}/{i:04d}.png"] = _png(_image(line, i))
    for i in range(3):
        files[f"{NO_MODEL_LINE}/{i}.png"] = _png(render_normal(NO_MODEL_LINE, i, SIZE))
    good = _png(render_normal(LINES[0], 7, SIZE))
    bad = dict(BAD_FILES)
    bad["icon.pcx"] = (_png(np.zeros((8, 8), np.uint8), "PCX"), "unsupported_format")
    bad["cut.png"] = (good[: len(good) // 2], "truncated")
    for name, (data, reason) in bad.items():
        files[f"{LINES[0]}/bad/{name}"] = data
        errors[f"{bucket}/archive/{LINES[0]}/bad/{name}"] = reason
    for i in range(3):
        errors[f"{bucket}/archive/{NO_MODEL_LINE}/{i}.png"] = "no_model"

    local = tmp / "archive"
    for rel, data in files.items():
        storage.write_bytes_atomic(str(local / rel), data)
        storage.write_bytes_atomic(f"{bucket}/archive/{rel}", data)
    images = {f"{bucket}/archive/{rel}": data for rel, data in files.items()}

    uris = sorted(images)
    lines = [u.split("/archive/")[1].split("/")[0] for u in uris]
    ids: list[str | None] = [None] * len(uris)
    extra_uris = [f"{bucket}/archive/{LINES[1]}/missing.png", f"{bucket}/archive/{LINES[1]}/x.png"]
    uris += extra_uris + [uris[5]]
    lines += [LINES[1], LINES[1], lines[5]]
    ids += [None, "../escape", None]  # not found; unsafe id; the same image listed twice
    errors[extra_uris[0]] = "not_found"
    errors[extra_uris[1]] = "bad_image_id"
    listing = pa.table({"image_uri": uris, "product_line": lines, "image_id": ids})
    buf = pa.BufferOutputStream()
    pq.write_table(listing, buf)
    listing_uri = f"{bucket}/listings/{DATE}.parquet"
    storage.write_bytes_atomic(listing_uri, buf.getvalue().to_pybytes())
    return World(
        bucket=bucket,
        models_uri=models_uri,
        local_archive=local,
        s3_archive=f"{bucket}/archive",
        listing_uri=listing_uri,
        cache_dir=tmp / "cache",
        images=images,
        expected_errors=errors,
        listing_rows=len(uris),
    )


def _config(world: World, input_uri: str, output_uri: str, **changes) -> ScoreJobConfig:
    base = ScoreJobConfig(
        models_uri=world.models_uri,
        input_uri=input_uri,
        output_uri=output_uri,
        run_date=DATE,
        batch_size=16,
        cpus_per_actor=0.5,
        max_actors=2,  # two actor start-ups per job, not three (the suite is CPU bound)
        decode_cpus=0.25,
        shard_size=40,
        masks="anomalous",
        cache_dir=str(world.cache_dir),
        quiet=True,
        max_error_fraction=0.5,
    )
    return replace(base, **changes)


def _direct(world: World) -> dict[str, tuple[float, np.ndarray, float, float, float, float]]:
    """image_uri -> (max of the map, anomaly map, pixel threshold, its image threshold, image
    score, image-score threshold), scored by dfr_core."""
    out = {}
    for line in LINES:
        version = registry.latest_version(world.models_uri, line)
        loaded = load_model(registry.fetch(world.models_uri, line, version, world.cache_dir))
        uris = [u for u in world.images if f"/archive/{line}/" in u and "/bad/" not in u]
        batch = np.stack([resize_image(decode_image(world.images[u]), SIZE) for u in uris])
        maps = compute_maps(loaded.model, batch)
        cal = loaded.calibration
        for k, uri in enumerate(uris):
            out[uri] = (
                float(maps.max_score[k]),
                maps.anomaly_map[k].numpy(),
                cal.pixel_threshold,
                cal.max_threshold,
                float(maps.score[k]),
                cal.image_threshold,
            )
    return out


def _read_listing(world: World) -> pa.Table:
    fs, path = storage.pyarrow_fs(world.listing_uri)
    return pq.read_table(path, filesystem=fs)


@pytest.fixture(scope="module")
def listing_run(world):
    """The production path: a Parquet listing on S3, outputs on S3."""
    output = f"{world.bucket}/out-listing"
    summary = run_score_job(_config(world, world.listing_uri, output, heatmaps=True))
    return output, summary


def test_every_input_once_and_bad_input_is_data(world, listing_run):
    output, summary = listing_run
    df = outputs.read_scores(output)
    assert len(df) == world.listing_rows == summary.counts["rows"]
    assert Counter(df["image_uri"]) == Counter(_read_listing(world)["image_uri"].to_pylist())
    errors = df[df["status"] == "error"]
    by_uri = dict(zip(errors["image_uri"], errors["error_reason"], strict=True))
    for uri, reason in world.expected_errors.items():
        assert by_uri[uri] == reason, uri
    duplicated = df[df["error_reason"] == "duplicate_image_id"]
    assert len(duplicated) == 1
    assert (df["status"] == "ok").sum() == 2 * PER_LINE
    assert all(
        e.startswith(f"{r}: ") for e, r in zip(errors["error"], errors["error_reason"], strict=True)
    )
    assert errors["score"].isna().all() and errors["mask_uri"].isna().all()
    assert summary.counts["error_reasons"] == dict(sorted(Counter(errors["error_reason"]).items()))
    assert set(df[df["error_reason"] == "no_model"]["product_line"]) == {NO_MODEL_LINE}
    assert df[df["product_line"] == NO_MODEL_LINE]["model_version"].isna().all()
    assert not summary.failed


def test_scores_and_masks_equal_direct_dfr_core(world, listing_run):
    output, _ = listing_run
    df = outputs.read_scores(output)
    ok = df[df["status"] == "ok"].drop_duplicates("image_uri")
    direct = _direct(world)
    assert set(ok["image_uri"]) == set(direct)
    for row in ok.itertuples():
        score, amap, pixel_thr, max_thr, image_score, image_thr = direct[row.image_uri]
        assert row.score == pytest.approx(score, rel=1e-4)  # raw: max of the map
        assert row.threshold == pytest.approx(max_thr) and row.pixel_threshold == pixel_thr
        # the fused, normalised image score: the same number dfr_core computes
        assert row.anomaly_score == pytest.approx(image_score, rel=1e-4, abs=1e-4)
        assert row.anomaly_threshold == pytest.approx(image_thr)
        assert bool(row.is_anomaly) == (row.anomaly_score > image_thr)
        assert row.defect_area_fraction == pytest.approx((amap > pixel_thr).mean(), abs=2e-3)
        original = decode_image(world.images[row.image_uri])
        assert (row.height, row.width) == original.shape[:2]
    masked = ok[ok["mask_uri"].notna()]
    assert len(masked) == int(ok["is_anomaly"].sum()) > 0  # --masks anomalous
    for row in masked.itertuples():
        _, amap, pixel_thr, *_ = direct[row.image_uri]
        full = F.interpolate(
            torch.from_numpy(amap)[None, None], size=(row.height, row.width), mode="bilinear"
        )[0, 0].numpy()
        mask = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row.mask_uri))))
        assert mask.shape == (row.height, row.width) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert np.mean((mask == 255) != (full > pixel_thr)) < 1e-3
        heat = Image.open(io.BytesIO(storage.read_bytes(row.heatmap_uri)))
        assert heat.size == (row.width, row.height) and heat.mode == "RGB"


def test_masks_exist_exactly_for_rows_naming_them(world, listing_run):
    output, summary = listing_run
    df = outputs.read_scores(output)
    named = set(df["mask_uri"].dropna()) | set(df["heatmap_uri"].dropna())
    on_storage = set(storage.list_files(f"{output}/masks"))
    assert on_storage == named
    assert summary.counts["masks"] == df["mask_uri"].notna().sum()
    for uri in df["mask_uri"].dropna():
        assert f"/masks/run_date={DATE}/product_line=" in uri


def test_files_have_documented_schema_and_run_record(world, listing_run):
    output, summary = listing_run
    files = outputs.committed_files(output)
    assert files and all("/scores/run_date=2024-05-01/product_line=" in f for f in files)
    for uri in files:
        fs, path = storage.pyarrow_fs(uri)
        assert pq.read_schema(path, filesystem=fs).remove_metadata().equals(outputs.SCORE_SCHEMA)
    record = json.loads(storage.read_text(summary.record_uri))
    assert record["run_id"] == summary.run_id and record["run_date"] == DATE
    assert set(record["models"]) == {*LINES, NO_MODEL_LINE}
    assert record["models"][NO_MODEL_LINE] is None
    assert record["counts"]["rows"] == world.listing_rows
    assert record["input"]["uri"] == world.listing_uri and record["input"]["source"] == "file"
    assert {"listing_s", "models_s", "scoring_s"} <= set(record["timings"])
    assert sorted(f"{output}/{rel}" for rels in record["files"].values() for rel in rels) == files


def test_rerun_adds_nothing(world, listing_run):
    output, first = listing_run
    before = sorted(storage.list_files(output))
    again = run_score_job(_config(world, world.listing_uri, output, heatmaps=True))
    assert again.already_committed and again.processed == 0
    assert again.run_id == first.run_id
    assert sorted(storage.list_files(output)) == before
    assert len(outputs.read_scores(output)) == world.listing_rows


def test_prefix_run_interrupted_then_resumed(world, tmp_path):
    """Prefix input on local disk; stop after 2 shards, leave a stale partial file, resume."""
    output = str(tmp_path / "out")
    config = _config(world, str(world.local_archive), output, masks="all")
    with pytest.raises(RunInterrupted):
        run_score_job(replace(config, stop_after_shards=2))
    assert len(outputs.read_scores(output)) == 0  # nothing visible before the run record
    partial = sorted((tmp_path / "out" / "scores").rglob("*.parquet"))
    assert len(partial) == 2
    committed_rows = sum(pq.read_metadata(p).num_rows for p in partial)
    # A crash between a shard's file and its marker leaves a file with a deterministic name:
    # plant one with garbage rows for an uncommitted shard; the resumed run must overwrite it.
    run_key = partial[0].stem.rsplit("-", 1)[1]
    stale = next(
        Path(outputs.shard_file_uri(output, DATE, LINES[0], shard, run_key))
        for shard in range(3)
        if not Path(outputs.shard_file_uri(output, DATE, LINES[0], shard, run_key)).exists()
    )
    # Which shards Ray finishes first is not fixed: the 2 committed ones may both be of the
    # other line, so the stale file's directory may not exist yet.
    stale.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pq.read_table(partial[0]).slice(0, 3), stale)

    summary = run_score_job(config)
    assert summary.skipped == committed_rows
    assert summary.processed == summary.counts["rows"] - committed_rows
    df = outputs.read_scores(output)
    n_files = sum(1 for p in world.local_archive.rglob("*") if p.is_file())
    assert len(df) == n_files == summary.counts["rows"]
    assert df["image_uri"].is_unique and df.groupby("product_line")[
        "image_id"
    ].nunique().sum() == len(df)
    everything = outputs.read_scores(output, committed_only=False)
    assert len(everything) == len(df)  # no leftovers, even when reading uncommitted files
    ok = df[df["status"] == "ok"]
    assert ok["mask_uri"].notna().all()  # --masks all
    masks = set(storage.list_files(f"{output}/masks"))
    assert masks == set(df["mask_uri"].dropna())
    bad = df[df["image_uri"].str.contains("/bad/")]
    assert dict(
        zip(bad["image_uri"].str.rsplit("/", n=1).str[1], bad["error_reason"], strict=True)
    ) == {k: v[1] for k, v in BAD_FILES.items()}


def test_changed_listing_supersedes_same_date(world, tmp_path):
    """A second run of the same date with a different listing replaces the first one's rows."""
    output = str(tmp_path / "out")
    table = _read_listing(world)
    small = tmp_path / "small.csv"
    table.slice(0, 20).to_pandas().to_csv(small, index=False)
    first = run_score_job(_config(world, str(small), output, masks="none"))
    table.slice(0, 30).to_pandas().to_csv(small, index=False)
    second = run_score_job(_config(world, str(small), output, masks="none"))
    assert first.run_id != second.run_id
    df = outputs.read_scores(output)
    assert len(df) == 30 and df["run_id"].eq(second.run_id).all()
    assert len(outputs.read_scores(output, committed_only=False)) == 30  # old files removed
    assert len(outputs.committed_runs(output)) == 2


def test_queries_pandas_and_duckdb(world, tmp_path):
    """The README's queries: pandas with partition filters, DuckDB on committed scores."""
    output = str(tmp_path / "out")
    listing = tmp_path / "listing.parquet"
    pq.write_table(_read_listing(world).slice(100, 60), listing)  # two lines with models
    for date in ("2024-05-01", "2024-05-02"):
        run_score_job(_config(world, str(listing), output, run_date=date, masks="none"))

    one_day = pd.read_parquet(
        f"{output}/scores",
        filters=[("run_date", "=", "2024-05-02"), ("product_line", "=", LINES[0])],
    )
    assert len(one_day) and set(one_day["product_line"].astype(str)) == {LINES[0]}
    assert set(one_day["run_date"].astype(str)) == {"2024-05-02"}

    con = duckdb.connect()
    outputs.register_duckdb(con, output)
    top = con.execute(
        """
        SELECT product_line, image_id, score FROM (
            SELECT *, row_number() OVER (PARTITION BY product_line ORDER BY score DESC) AS rank
            FROM scores WHERE run_date = '2024-05-01' AND status = 'ok')
        WHERE rank <= 3 ORDER BY product_line, score DESC
        """
    ).df()
    expected = (
        outputs.read_scores(output, run_date="2024-05-01")
        .query("status == 'ok'")
        .sort_values(["product_line", "score"], ascending=[True, False])
        .groupby("product_line")
        .head(3)
    )
    assert top["image_id"].tolist() == expected["image_id"].tolist()
    rate = con.execute(
        """
        SELECT run_date, product_line, avg(is_anomaly::INT) AS anomaly_rate, count(*) AS images
        FROM scores WHERE status = 'ok' GROUP BY ALL ORDER BY ALL
        """
    ).df()
    assert len(rate) == 2 * rate["product_line"].nunique()
    assert rate["anomaly_rate"].between(0, 1).all()

    # Plain SQL without Python helpers (local outputs): committed runs come from the records.
    raw = con.execute(
        f"""
        SELECT count(*) FROM read_parquet('{output}/scores/*/*/*.parquet', hive_partitioning=true)
        WHERE run_id IN (SELECT run_id FROM read_json_auto('{output}/runs/*.json'))
        """
    ).fetchone()[0]
    assert raw == 2 * 60


def test_cli_score_and_nightly(world, tmp_path):
    output = str(tmp_path / "out")
    listing = tmp_path / "listing.csv"
    uris = [u for u in world.images if "/bad/" not in u][:12]
    lines = [u.split("/archive/")[1].split("/")[0] for u in uris]
    pd.DataFrame({"image_uri": uris, "product_line": lines}).to_csv(listing, index=False)
    common = ["--models-uri", world.models_uri, "--input", str(listing), "--output", output]
    opts = ["--cpus-per-actor", "0.5", "--decode-cpus", "0.25", "--batch-size", "8", "--quiet"]
    result = CliRunner().invoke(score, [*common, *opts, "--run-date", DATE, "--masks", "none"])
    assert result.exit_code == 0, result.output
    assert "12 listed" in result.output and "images/s" in result.output

    config = tmp_path / "nightly.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            models_uri: {world.models_uri}
            input_uri: {tmp_path}/{{run_date}}.csv
            output_uri: {output}
            run_date: 2024-05-03
            cpus_per_actor: 0.5
            max_actors: 2
            decode_cpus: 0.25
            batch_size: 8
            cache_dir: {world.cache_dir}
            max_error_fraction: 0.2
            """
        )
    )
    bad = pd.DataFrame(
        {
            "image_uri": [f"{tmp_path}/nothing-{i}.png" for i in range(3)] + [world.listing_uri],
            "product_line": LINES[0],
        }
    )
    pd.concat([pd.read_csv(listing), bad]).to_csv(tmp_path / "2024-05-03.csv", index=False)
    result = CliRunner().invoke(nightly, ["--config", str(config), "--quiet"])
    assert result.exit_code == 3, result.output  # 4 of 16 rows failed > 20 %
    assert "not_found=3" in result.output and "FAILED" in result.output
    df = outputs.read_scores(output, run_date="2024-05-03")
    assert len(df) == 16  # committed all the same: errors are data
    result = CliRunner().invoke(nightly, ["--config", str(config), "--quiet"])
    assert "already committed" in result.output
    assert len(outputs.read_scores(output, run_date="2024-05-03")) == 16
