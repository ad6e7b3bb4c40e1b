"""A listing resolved in chunks (spilled, merged, finished piece by piece) equals the listing
resolved as one table: same rows in the same order, shards, fingerprint and shard index."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dfr_core.config import ModelConfig
from pipeline import listing as listing_mod
from pipeline import listing_rows
from pipeline.listing import load_listing, resolve
from pipeline.score_job import LineModel, wave_blocks, waves

REPO = Path(__file__).resolve().parents[2]


def _rows(n: int, seed: int = 0) -> list[dict]:
    """Several lines, given and derived ids, duplicates (also across chunks) and bad rows."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        line = rng.choice(["a", "b", "c", "../bad"])
        given = rng.choice([None, None, f"id{rng.randrange(n // 3)}", "", "../evil"])
        uri = f"/x/{line}/{rng.randrange(n)}.png" if rng.random() > 0.02 else ""
        rows.append({"image_uri": uri, "product_line": line, "image_id": given})
    rows += [dict(rows[5]), dict(rows[7])]  # exact duplicate rows
    return rows


def _raw(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=pa.schema([(k, pa.string()) for k in rows[0]]))
    return table.append_column("captured_at", pa.nulls(len(rows), listing_rows.TIMESTAMP))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, merge batches of 3, stored pieces of 5: every boundary is crossed."""
    monkeypatch.setattr(listing_mod, "CHUNK_ROWS", 7)
    monkeypatch.setattr(listing_rows, "MERGE_ROWS", 3)
    monkeypatch.setattr(listing_rows, "OUT_ROWS", 5)


@pytest.mark.parametrize("shard_size", [1, 4, 1000])
def test_chunked_listing_equals_the_whole_table(tmp_path, monkeypatch, shard_size):
    rows = _rows(300)
    whole = resolve(_raw(rows), shard_size=shard_size, source="file")
    assert not whole.spilled
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "l.parquet", row_group_size=11)
    monkeypatch.setattr(listing_mod, "CHUNK_ROWS", 7)
    monkeypatch.setattr(listing_rows, "MERGE_ROWS", 3)
    monkeypatch.setattr(listing_rows, "OUT_ROWS", 5)
    chunked = load_listing(str(tmp_path / "l.parquet"), shard_size=shard_size)
    assert chunked.spilled
    assert chunked.table.equals(whole.table)
    assert chunked.fingerprint == whole.fingerprint
    assert chunked.shards == whole.shards
    assert chunked.product_lines == whole.product_lines == ["a", "b", "c"]
    assert chunked.num_rows == whole.num_rows == len(rows)
    reasons = set(chunked.table.column("error_reason").to_pylist())
    assert {"duplicate_image_id", "bad_product_line", "bad_image_id", "bad_uri"} <= reasons
    for start, stop in [(0, 1), (3, 17), (290, 400), (5, 5)]:
        got = pa.concat_tables([whole.table.slice(0, 0), *chunked.rows(start, stop)])
        assert got.equals(whole.table.slice(start, max(0, min(stop, len(rows)) - start)))
    spill = Path(chunked._path).parent  # noqa: SLF001 - the spill must go away on close
    assert spill.is_dir()
    chunked.close()
    assert not spill.exists()


def test_chunked_csv_with_products_filter(tmp_path, small_chunks):
    rows = _rows(120, seed=1)
    lines = ["image_uri,product_line,image_id"]
    lines += [f"{r['image_uri']},{r['product_line']},{r['image_id'] or ''}" for r in rows]
    (tmp_path / "l.csv").write_text("\n".join(lines) + "\n")
    got = load_listing(str(tmp_path / "l.csv"), products=("b", "c"), shard_size=3)
    kept = [r for r in rows if r["product_line"] in ("b", "c")]
    for r in kept:
        r["image_id"] = r["image_id"] or None
    want = resolve(_raw(kept), shard_size=3, source="file")
    assert got.table.equals(want.table) and got.fingerprint == want.fingerprint
    got.close()


def test_waves_cover_pending_shards_once_in_listing_order():
    pending = {("a", i): (i * 10, 10) for i in range(7)} | {("b", 0): (70, 25)}
    out = waves(pending, wave_rows=30)
    assert [sorted(w) for w in out] == [
        [("a", 0), ("a", 1), ("a", 2)],
        [("a", 3), ("a", 4), ("a", 5)],
        [("a", 6)],
        [("b", 0)],
    ]
    assert waves({}) == []


def test_wave_blocks_hold_exactly_the_wave_rows(small_chunks, tmp_path):
    rows = _rows(200, seed=2)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "l.parquet")
    listing = load_listing(str(tmp_path / "l.parquet"), shard_size=4)
    pending = dict(list(listing.shards.items())[1::3])  # gaps: an interrupted run's rest
    models = {
        "a": LineModel("a", "v1", ModelConfig(image_size=64)),
        "b": LineModel("b", None, None, "no_model", "no model for b"),
        "c": LineModel("c", "v1", ModelConfig(image_size=64)),
    }
    got = []
    for wave in waves(pending, wave_rows=9):
        got += wave_blocks(listing, wave, models, step=3)
    assert all(b.num_rows <= 3 for b in got)
    for block in got:  # a block never spans two shards (shards commit one after another)
        lines, shards = block.column("product_line").to_pylist(), block.column("shard").to_pylist()
        assert len(set(zip(lines, shards, strict=True))) == 1
    table = pa.concat_tables(got)
    lines, shards = table.column("product_line").to_pylist(), table.column("shard").to_pylist()
    keys = list(zip(lines, shards, strict=True))
    assert sorted(set(keys)) == sorted(pending)
    assert table.num_rows == sum(n for _, n in pending.values())
    for row in table.to_pylist():
        if row["product_line"] == "b":
            assert row["status"] == "error"
    listing.close()


def test_the_scoring_driver_imports_no_torch(tmp_path):
    """The driver's modules, the listing, model pinning and the CLI's score command, in a
    fresh process: torch (~1 GB of RSS with the CUDA build) stays out."""
    (tmp_path / "l.csv").write_text("image_uri,product_line\n/x/a/1.png,a\n/x/a/2.png,a\n")
    code = f"""
import sys
from click.testing import CliRunner
from pipeline import score_graph, score_job
from pipeline.cli import score as score_cli
from pipeline.listing import load_listing
from pipeline.storage import StorageOptions
listing = load_listing({str(tmp_path / "l.csv")!r}, shard_size=1)
config = score_job.ScoreJobConfig(models_uri={str(tmp_path / "models")!r},
    input_uri={str(tmp_path / "l.csv")!r}, output_uri={str(tmp_path / "out")!r},
    run_date="2024-05-01", cache_dir={str(tmp_path / "cache")!r})
model = score_job.resolve_model(config, "a", StorageOptions.from_env(), check_head=False)
assert model.error_reason == "no_model", model
blocks = score_job.wave_blocks(listing, listing.shards, {{"a": model}}, 8)
assert sum(b.num_rows for b in blocks) == 2
result = CliRunner().invoke(score_cli.score, ["--help"])
assert result.exit_code == 0, result.output
print("torch" in sys.modules, "pipeline.score_stages" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]
