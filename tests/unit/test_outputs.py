"""Output contracts without Ray: names, mask encoding, shard commits, run records, readers."""

from __future__ import annotations

import datetime as dt
import io

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import outputs

NOW = dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC)


def _rows(ids: list[str], run_id: str, anomalous: bool = False) -> pa.Table:
    n = len(ids)
    return pa.table(
        {
            "image_id": ids,
            "image_uri": [f"/in/{i}.png" for i in ids],
            "score": [1.0] * n,
            "threshold": [0.5] * n,
            "pixel_threshold": [0.4] * n,
            "is_anomaly": [anomalous] * n,
            "defect_area_fraction": [0.1] * n,
            "mask_uri": [None] * n,
            "heatmap_uri": [None] * n,
            "model_version": ["v1"] * n,
            "run_id": [run_id] * n,
            "scored_at": [NOW] * n,
            "captured_at": [None] * n,
            "width": [10] * n,
            "height": [8] * n,
            "status": ["ok"] * n,
            "error_reason": [None] * n,
            "error": [None] * n,
        }
    )


def _commit(out: str, run_id: str, run_key: str, date: str, shards: dict) -> dict:
    """Write shards {(line, shard): ids} and the run record, as the job does."""
    files: dict[str, list[str]] = {}
    for (line, shard), ids in shards.items():
        marker = outputs.write_shard(out, date, run_key, line, shard, _rows(ids, run_id), None)
        files.setdefault(line, []).append(marker["file"])
    record = {
        "run_id": run_id,
        "run_key": run_key,
        "run_date": date,
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
        "files": files,
    }
    outputs.write_run_record(out, record, None)
    return record


def test_names_are_validated_and_deterministic(tmp_path):
    out = str(tmp_path)
    uri = outputs.shard_file_uri(out, "2024-05-01", "line_a", 7, "abc123")
    assert uri == f"{out}/scores/run_date=2024-05-01/product_line=line_a/part-00007-abc123.parquet"
    assert outputs.mask_uri(out, "2024-05-01", "line_a", "img1").endswith(
        "/masks/run_date=2024-05-01/product_line=line_a/img1.png"
    )
    for bad_date in ("2024-5-1", "2024-02-30", "../x"):
        with pytest.raises(ValueError):
            outputs.check_run_date(bad_date)
    with pytest.raises(ValueError):
        outputs.mask_uri(out, "2024-05-01", "../up", "img")
    with pytest.raises(ValueError):
        outputs.mask_uri(out, "2024-05-01", "line", "a/b")


def test_mask_png_is_8bit_0_255_and_heatmap_rgb():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:5] = True
    img = Image.open(io.BytesIO(outputs.encode_mask_png(mask)))
    assert img.mode == "L" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), np.where(mask, 255, 0))
    heat = Image.open(io.BytesIO(outputs.encode_heatmap_png(np.random.rand(5, 7), 0.5)))
    assert heat.mode == "RGB" and heat.size == (7, 5)


def test_write_shard_sorts_casts_and_marks(tmp_path):
    out = str(tmp_path)
    marker = outputs.write_shard(out, "2024-05-01", "k1", "a", 0, _rows(["z", "b", "m"], "r"))
    path = tmp_path / marker["file"]
    table = pq.read_table(path)
    assert table.schema.remove_metadata().equals(outputs.SCORE_SCHEMA)
    assert table.column("image_id").to_pylist() == ["b", "m", "z"]
    assert marker["counts"]["rows"] == 3 and marker["counts"]["ok"] == 3
    assert outputs.committed_shards(out, "2024-05-01", "k1") == {("a", 0): marker}
    assert outputs.committed_shards(out, "2024-05-01", "other") == {}
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temp files


def test_counts_add_up():
    t = _rows(["a", "b"], "r", anomalous=True)
    c = outputs.shard_counts(t)
    assert c == {
        "rows": 2,
        "read": 2,
        "ok": 2,
        "anomalous": 2,
        "masks": 0,
        "errors": 0,
        "error_reasons": {},
    }
    total = outputs.add_counts(
        outputs.add_counts({}, c), {**c, "errors": 1, "error_reasons": {"x": 1}}
    )
    assert total["rows"] == 4 and total["errors"] == 1 and total["error_reasons"] == {"x": 1}


def test_readers_see_only_committed_runs_latest_per_date_and_line(tmp_path):
    out = str(tmp_path)
    # an uncommitted shard (no run record): invisible
    outputs.write_shard(out, "2024-05-01", "k0", "a", 0, _rows(["u1", "u2"], "run0"))
    assert outputs.read_scores(out).empty
    assert len(outputs.read_scores(out, committed_only=False)) == 2

    _commit(out, "run1", "k1", "2024-05-01", {("a", 0): ["x1", "x2"], ("b", 0): ["y1"]})
    _commit(out, "run2", "k2", "2024-05-01", {("a", 0): ["x1", "x2", "x3"]})  # reruns line a
    _commit(out, "run3", "k3", "2024-05-02", {("a", 0): ["n1"]})
    df = outputs.read_scores(out)
    got = sorted(zip(df["run_date"], df["product_line"], df["run_id"], strict=True))
    assert got == sorted(
        [("2024-05-01", "a", "run2")] * 3
        + [("2024-05-01", "b", "run1"), ("2024-05-02", "a", "run3")]
    )
    assert len(outputs.read_scores(out, run_date="2024-05-02")) == 1
    assert str(df["width"].dtype) == "Int32" and str(df["is_anomaly"].dtype) == "boolean"
    assert [r["run_id"] for r in outputs.committed_runs(out)] == ["run1", "run2", "run3"]

    removed = outputs.remove_superseded(out, "2024-05-01", "k2", ["a"])
    assert removed == 4  # run0's and run1's files and markers for line a; line b untouched
    assert len(outputs.read_scores(out, committed_only=False)) == 5
    assert outputs.read_run_record(out, "run1")["run_key"] == "k1"
    assert outputs.read_run_record(out, "nope") is None

    con = duckdb.connect()
    outputs.register_duckdb(con, out, view="s")
    rows = con.execute(
        "SELECT run_date, product_line, count(*) FROM s GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert rows == [("2024-05-01", "a", 3), ("2024-05-01", "b", 1), ("2024-05-02", "a", 1)]


def test_empty_output_reads_as_empty(tmp_path):
    df = outputs.read_scores(str(tmp_path / "nothing"))
    assert df.empty and list(df.columns) == outputs.READ_SCHEMA.names
    assert outputs.read_scores(str(tmp_path / "nothing"), committed_only=False).empty


def test_status_and_reason_codes_are_one_enum_each():
    """The documented reason lists are the enums the stages set (no second spelling)."""
    from pipeline.output_layout import LISTING_REASONS, READ_REASONS
    from pipeline.row_errors import ERROR, ListingReason, ReadReason, RowStatus

    assert LISTING_REASONS == tuple(r.value for r in ListingReason)
    assert READ_REASONS == tuple(r.value for r in ReadReason)
    assert ERROR == RowStatus.ERROR == "error" and RowStatus.OK == "ok"
