"""Listing contracts: deterministic order, ids, shards and fingerprint; problems become rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.listing import (
    INVALID_LINE,
    LISTING_SCHEMA,
    ListingError,
    derive_image_id,
    is_listing_file,
    load_listing,
    resolve,
)
from pipeline.storage import safe_component


def _raw(rows: list[tuple[str | None, str | None, str | None]]) -> pa.Table:
    uris, lines, ids = zip(*rows, strict=True) if rows else ((), (), ())
    n = len(rows)
    return pa.table(
        {
            "image_uri": pa.array(uris, pa.string()),
            "product_line": pa.array(lines, pa.string()),
            "image_id": pa.array(ids, pa.string()),
            "captured_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        }
    )


def test_derived_ids_are_stable_safe_and_distinct():
    a = derive_image_id("s3://b/line/a.png")
    assert a == derive_image_id("s3://b/line/a.png") and safe_component(a) == a
    assert a != derive_image_id("s3://b/line/b.png")


def test_resolve_is_deterministic_and_sharded_per_line():
    rows = [(f"/x/{line}/{i}.png", line, None) for line in ("b", "a") for i in range(5)]
    one = resolve(_raw(rows), shard_size=2, source="file")
    two = resolve(_raw(list(reversed(rows))), shard_size=2, source="file")
    assert one.table.equals(two.table) and one.fingerprint == two.fingerprint
    assert one.table.schema.equals(LISTING_SCHEMA)
    t = one.table.to_pylist()
    assert [r["product_line"] for r in t] == ["a"] * 5 + ["b"] * 5
    assert [r["shard"] for r in t] == [0, 0, 1, 1, 2] * 2
    assert [r["image_id"] for r in t[:5]] == sorted(r["image_id"] for r in t[:5])
    assert one.product_lines == ["a", "b"]
    changed = resolve(_raw(rows[:-1]), shard_size=2, source="file")
    assert changed.fingerprint != one.fingerprint
    assert resolve(_raw(rows), shard_size=3, source="file").fingerprint != one.fingerprint


def test_row_problems_become_error_rows_not_drops():
    rows = [
        ("/x/a/1.png", "a", "img-1"),
        ("/x/a/2.png", "a", "img-1"),  # duplicate id within the line
        ("/x/a/3.png", "a", "../evil"),  # unsafe given id
        ("/x/a/4.png", "../etc", None),  # unsafe product line
        ("/x/a/5.png", None, None),  # no product line
        ("", "a", None),  # no uri
        ("/x/b/1.png", "b", "img-1"),  # the same id in another line is fine
    ]
    listing = resolve(_raw(rows), shard_size=10, source="file")
    t = listing.table
    assert t.num_rows == len(rows)
    by_uri = {r["image_uri"]: r for r in t.to_pylist()}
    assert by_uri["/x/a/1.png"]["status"] == "ok" and by_uri["/x/b/1.png"]["status"] == "ok"
    assert by_uri["/x/a/2.png"]["error_reason"] == "duplicate_image_id"
    assert "/x/a/1.png" in by_uri["/x/a/2.png"]["error"]
    assert by_uri["/x/a/3.png"]["error_reason"] == "bad_image_id"
    for uri in ("/x/a/4.png", "/x/a/5.png"):
        assert by_uri[uri]["error_reason"] == "bad_product_line"
        assert by_uri[uri]["product_line"] == INVALID_LINE
    assert by_uri[""]["error_reason"] == "bad_uri"
    assert listing.product_lines == ["a", "b"]
    for row in t.to_pylist():
        assert (row["error"] is None) == (row["status"] == "ok")


def test_csv_listing_keeps_ids_as_strings_parses_times_resolves_relative(tmp_path):
    (tmp_path / "listing.csv").write_text(
        "image_uri,product_line,image_id,captured_at,extra\n"
        "imgs/a.png,line1,0012,2024-05-01T10:00:00Z,x\n"
        "/abs/b.png,line1,,2024-05-01 12:30:00,y\n"
        "s3://bucket/c.png,line2,,,z\n"
    )
    listing = load_listing(str(tmp_path / "listing.csv"), shard_size=10)
    rows = {r["image_uri"]: r for r in listing.table.to_pylist()}
    assert set(rows) == {str(tmp_path / "imgs" / "a.png"), "/abs/b.png", "s3://bucket/c.png"}
    a = rows[str(tmp_path / "imgs" / "a.png")]
    assert a["image_id"] == "0012" and a["captured_at"].hour == 10
    assert rows["/abs/b.png"]["image_id"] == derive_image_id("/abs/b.png")
    assert rows["/abs/b.png"]["captured_at"].minute == 30
    assert rows["s3://bucket/c.png"]["captured_at"] is None
    assert listing.source == "file"
    only = load_listing(str(tmp_path / "listing.csv"), products=("line2",), shard_size=10)
    assert only.table.column("image_uri").to_pylist() == ["s3://bucket/c.png"]


def test_parquet_listing_and_listing_errors(tmp_path):
    pq.write_table(
        pa.table({"image_uri": ["/a.png"], "product_line": ["p"], "captured_at": [None]}),
        tmp_path / "l.parquet",
    )
    assert load_listing(str(tmp_path / "l.parquet")).table.num_rows == 1
    pq.write_table(pa.table({"image_uri": ["/a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(ListingError, match="product_line"):
        load_listing(str(tmp_path / "bad.parquet"))
    (tmp_path / "t.csv").write_text("image_uri,product_line,captured_at\n/a.png,p,yesterday\n")
    with pytest.raises(ListingError, match="captured_at"):
        load_listing(str(tmp_path / "t.csv"))
    with pytest.raises(ListingError, match="not found"):
        load_listing(str(tmp_path / "missing.csv"))
    with pytest.raises(ListingError, match="prefix"):
        load_listing(str(tmp_path / "no-such-prefix"))


def test_prefix_listing_lines_hidden_files_and_product_filter(tmp_path):
    for rel in ("a/1.png", "a/sub/2.jpg", "a/.uploading.png", "b/3.txt", "stray.png"):
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    listing = load_listing(str(tmp_path / "in"))
    rows = {r["image_uri"].rsplit("/in/", 1)[1]: r for r in listing.table.to_pylist()}
    assert set(rows) == {"a/1.png", "a/sub/2.jpg", "b/3.txt", "stray.png"}
    assert rows["a/sub/2.jpg"]["product_line"] == "a"
    assert rows["b/3.txt"]["status"] == "ok"  # a non-image is the decode stage's error
    assert rows["stray.png"]["error_reason"] == "bad_product_line"
    assert listing.source == "prefix"
    only_b = load_listing(str(tmp_path / "in"), products=("b", "absent"))
    assert [r["product_line"] for r in only_b.table.to_pylist()] == ["b"]


def test_is_listing_file():
    assert is_listing_file("s3://b/x.parquet") and is_listing_file("/x/L.CSV")
    assert not is_listing_file("s3://b/archive/") and not is_listing_file("/x/img.png")


def test_a_relative_entry_climbing_out_of_the_listing_folder_is_a_bad_uri_row(tmp_path):
    """One relative-URI rule (storage.resolve_relative) for listings, list files, manifests and
    feedback tables: ``..`` is refused; in a listing that makes one error row, not a failure."""
    (tmp_path / "listing.csv").write_text(
        "image_uri,product_line\nimgs/./a.png,p\n../secret.png,p\nimgs/../../b.png,p\n"
    )
    rows = load_listing(str(tmp_path / "listing.csv"), shard_size=10).table.to_pylist()
    by_uri = {r["image_uri"]: r for r in rows}
    assert by_uri[str(tmp_path / "imgs" / "a.png")]["status"] == "ok"
    for entry in ("../secret.png", "imgs/../../b.png"):
        assert by_uri[entry]["error_reason"] == "bad_uri"
        assert "relative path references ('..') are not allowed" in by_uri[entry]["error"]
