"""The decode stage with each model geometry (issue 12), without Ray: a tiled line's rows carry
all their tiles and the plan; an image the geometry cannot take is exactly one error row with a
clear reason (too_small / too_many_tiles), refused from its header before any pixel is decoded;
untiled square and HxW lines get the same pixels as dfr_core's own preprocessing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dfr_core.config import ModelConfig
from dfr_core.decode import decode_image, header_size
from dfr_core.geometry import axis_origins, prepare_image
from pipeline.io_stages import DecodeConfig, decode_batch, prepared_rows

TILED = ModelConfig(image_size=64, tile=64, tile_overlap=16, max_tiles=12)
SQUARE = ModelConfig(image_size=32)
WIDE = ModelConfig(image_size=(32, 64))
GEOMETRY = {"tiled": TILED, "square": SQUARE, "wide": WIDE}


def _png(h: int, w: int, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _header_only_png(h: int, w: int) -> bytes:
    """A PNG whose header declares h x w but holds almost no pixel data: decoding it would fail
    (truncated), so a too_many_tiles row proves the refusal came from the header alone."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


#: name -> (product line, bytes, expected reason or None)
CASES = {
    "tiled_ok": ("tiled", _png(100, 150, 1), None),
    "tiled_exact": ("tiled", _png(64, 64, 2), None),
    "one_pixel": ("tiled", _png(1, 1), "too_small"),
    "long_thin": ("tiled", _png(3, 4000), "too_small"),
    "tall_thin": ("tiled", _png(4000, 3), "too_small"),
    "beyond_cap": ("tiled", _png(600, 600), "too_many_tiles"),
    "header_only": ("tiled", _header_only_png(5000, 5000), "too_many_tiles"),
    "square_ok": ("square", _png(40, 70, 3), None),
    "square_one_pixel": ("square", _png(1, 1), None),  # untiled: resized, as always
    "wide_ok": ("wide", _png(50, 130, 4), None),
}


def _batch() -> pa.Table:
    names = list(CASES)
    n = len(names)
    return pa.table(
        {
            "image_id": names,
            "product_line": [CASES[k][0] for k in names],
            "status": ["ok"] * n,
            "error_reason": pa.nulls(n, pa.string()),
            "error": pa.nulls(n, pa.string()),
            "data": pa.array([CASES[k][1] for k in names], pa.large_binary()),
        }
    )


@pytest.fixture(scope="module")
def decoded() -> dict[str, dict]:
    out = decode_batch(_batch(), DecodeConfig(GEOMETRY, max_pixels=10**8))
    assert out.num_rows == len(CASES)
    return {row["image_id"]: row for row in out.to_pylist()}


def test_each_image_is_one_row_with_its_reason(decoded):
    for name, (_, _, reason) in CASES.items():
        row = decoded[name]
        assert row["error_reason"] == reason, (name, row["error"])
        assert (row["status"] == "ok") == (reason is None) == (row["pixels"] is not None)
        if reason is not None:
            assert row["error"].startswith(f"{reason}: ") and row["tiles"] is None


def test_error_messages_name_the_sizes(decoded):
    assert "1x1" in decoded["one_pixel"]["error"] and "64 px tile" in decoded["one_pixel"]["error"]
    assert "3x4000" in decoded["long_thin"]["error"]
    assert "4000x3" in decoded["tall_thin"]["error"]
    beyond = decoded["beyond_cap"]["error"]
    assert "600x600" in beyond and "max_tiles is 12" in beyond
    assert "5000x5000" in decoded["header_only"]["error"]


def test_header_only_image_would_not_decode():
    """The header_only case is refused by size; its pixels could not even be decoded."""
    assert header_size(CASES["header_only"][1]) == (5000, 5000)
    with pytest.raises(ValueError):
        decode_image(CASES["header_only"][1], 10**8)


def test_tiled_rows_carry_every_tile_and_the_plan(decoded):
    row = decoded["tiled_ok"]
    rows, cols = axis_origins(100, 64, 16), axis_origins(150, 64, 16)
    assert row["tiles"] == len(rows) * len(cols) > 1
    assert (row["height"], row["width"]) == (100, 150)
    assert (row["map_height"], row["map_width"]) == (100, 150)  # scale 1: the image itself
    assert (row["tile_height"], row["tile_width"]) == (64, 64)
    expected = [v for r in rows for c in cols for v in (r, c)]
    assert row["origins"] == expected
    assert len(row["pixels"]) == row["tiles"] * 64 * 64 * 3
    assert decoded["tiled_exact"]["tiles"] == 1


def test_pixels_are_dfr_cores_preprocessing():
    """Every ok row's tiles and plan equal prepare_image on the decoded image: the same pixels
    training and calibration saw, for the tiled, the square and the HxW line."""
    table = decode_batch(_batch(), DecodeConfig(GEOMETRY, max_pixels=10**8))
    prepared = prepared_rows(table)
    names = table.column("image_id").to_pylist()
    assert {names[i] for i in prepared} == {k for k, v in CASES.items() if v[2] is None}
    for i, (tiles, plan) in prepared.items():
        line, data, _ = CASES[names[i]]
        want_tiles, want_plan = prepare_image(GEOMETRY[line], decode_image(data))
        np.testing.assert_array_equal(tiles, want_tiles)
        assert plan.height == want_plan.height and plan.width == want_plan.width
        assert plan.map_hw == want_plan.map_hw and plan.tile_hw == want_plan.tile_hw
        np.testing.assert_array_equal(plan.origins, want_plan.origins)
    by_name = {names[i]: p for i, p in prepared.items()}
    assert by_name["wide_ok"].tiles.shape == (1, 32, 64, 3)
    assert by_name["square_one_pixel"].tiles.shape == (1, 32, 32, 3)


def test_int_geometry_is_a_square_untiled_model():
    """DecodeConfig({"p": 32}) (what callers passed before issue 12) means ModelConfig(32)."""
    assert DecodeConfig({"p": 32}, 10).geometry == {"p": ModelConfig(image_size=32)}


def test_pixel_cap_comes_before_the_tile_cap():
    """An image over the decompression-bomb cap stays too_large (the header check leaves it
    to the decoder), whatever its tile count."""
    table = _batch().slice(0, 0)
    big = pa.table(
        {
            "image_id": ["big"],
            "product_line": ["tiled"],
            "status": ["ok"],
            "error_reason": pa.nulls(1, pa.string()),
            "error": pa.nulls(1, pa.string()),
            "data": pa.array([_header_only_png(5000, 5000)], pa.large_binary()),
        }
    )
    out = decode_batch(pa.concat_tables([table, big]), DecodeConfig(GEOMETRY, max_pixels=10**6))
    assert out.column("error_reason").to_pylist() == ["too_large"]
