"""Read and decode stages without Ray: every row comes out, errors carry reasons, and rows that
already failed pass through untouched (their bytes are never read)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from dfr_core.geometry import TilePlan
from pipeline.listing import resolve
from pipeline.score_stages import (
    DecodeConfig,
    Prepared,
    ReadConfig,
    decode_batch,
    image_chunks,
    read_batch,
)


def _png(h: int, w: int, gray: bool = False) -> bytes:
    shape = (h, w) if gray else (h, w, 3)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_read_then_decode(tmp_path):
    files = {
        "ok.png": _png(40, 50),
        "gray.png": _png(30, 20, gray=True),
        "big.png": _png(64, 64),
        "empty.png": b"",
        "text.png": b"hello",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dir.png").mkdir()
    uris = [str(tmp_path / n) for n in [*files, "dir.png", "missing.png"]]
    raw = pa.table(
        {
            "image_uri": uris + [str(tmp_path / "ok.png")],
            "product_line": ["p"] * len(uris) + ["../bad"],
            "image_id": [None] * (len(uris) + 1),
            "captured_at": pa.nulls(len(uris) + 1, pa.timestamp("us", tz="UTC")),
        }
    )
    table = resolve(raw, shard_size=100, source="file").table
    cap = len(files["big.png"]) - 1
    read = read_batch(table, ReadConfig(options=None, threads=4, max_bytes=cap))
    assert read.num_rows == table.num_rows
    decoded = decode_batch(read, DecodeConfig({"p": 32}, max_pixels=10**6))
    assert decoded.num_rows == table.num_rows and "data" not in decoded.column_names
    rows = {(r["image_uri"].rsplit("/", 1)[1], r["product_line"]): r for r in decoded.to_pylist()}
    reasons = {k[0]: r["error_reason"] for k, r in rows.items() if k[1] == "p"}
    assert reasons == {
        "ok.png": None,
        "gray.png": None,
        "big.png": "file_too_large",
        "empty.png": "empty_file",
        "text.png": "not_an_image",
        "dir.png": "read_error",
        "missing.png": "not_found",
    }
    ok = rows[("ok.png", "p")]
    assert (ok["width"], ok["height"], ok["tile_height"], ok["tile_width"]) == (50, 40, 32, 32)
    assert ok["tiles"] == 1 and ok["origins"] == [0, 0]  # an untiled model: one input
    assert len(ok["pixels"]) == 32 * 32 * 3 and ok["status"] == "ok"
    gray = rows[("gray.png", "p")]
    assert (gray["width"], gray["height"]) == (20, 30)
    bad_line = rows[("ok.png", "_invalid")]  # failed in the listing: passed through, not read
    assert bad_line["error_reason"] == "bad_product_line" and bad_line["width"] is None
    for r in decoded.to_pylist():
        assert (r["status"] == "ok") == (r["error"] is None) == (r["pixels"] is not None)


def _prepared(n_tiles: int) -> Prepared:
    plan = TilePlan(64, 64, (64, 64), np.zeros((n_tiles, 2), np.int64), (32, 32))
    return Prepared(np.zeros((n_tiles, 32, 32, 3), np.uint8), plan)


def test_image_chunks_pack_whole_images_up_to_the_pass_size():
    """An image's tiles are never split over two chunks; an image with more tiles than a pass
    is a chunk alone; otherwise chunks fill up to the pass size, in row order."""
    tiles = {0: 1, 1: 2, 2: 9, 3: 1, 4: 4, 5: 4}
    prepared = {i: _prepared(n) for i, n in tiles.items()}
    assert image_chunks(list(tiles), prepared, 4) == [[0, 1], [2], [3], [4], [5]]
    assert image_chunks(list(tiles), prepared, 32) == [list(tiles)]
    untiled = {i: _prepared(1) for i in range(5)}  # untiled models: batch_size images per pass
    assert image_chunks(list(untiled), untiled, 2) == [[0, 1], [2, 3], [4]]
