"""A corpus of hostile image files and what decoding makes of each (pure unit tests).

The corpus is the contract for untrusted input: every file either decodes to an image the model
can take (then the scoring job gives it a scored row) or raises DecodeError with a specific,
stable reason (then it is an error row). Nothing may crash, hang or allocate the declared size
of a decompression bomb. ``hostile_corpus`` is also loaded by the job-level test
(tests/integration/test_bad_inputs_job.py) and by benchmarks/reliability.py, so all three agree
on what was tried.
"""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from dfr_core.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from dfr_core.preprocess import resize_image

#: Side the PNG bomb declares: 10^10 pixels, far above any cap, from a file of ~100 bytes.
BOMB_SIDE = 100_000


@dataclass(frozen=True)
class Hostile:
    """One corpus file: its bytes, what it is, and what decoding must make of it.

    ``reason`` None means "a valid image": decode_image returns an array of ``shape`` (the
    original size after EXIF orientation) that resize_image accepts.
    """

    name: str  # file name as stored, extension included (sometimes deliberately wrong)
    kind: str  # the hostile category, for the reliability table
    data: bytes
    reason: str | None
    shape: tuple[int, int] | None = None  # (height, width) for valid images


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _gradient(height: int, width: int) -> np.ndarray:
    """A deterministic RGB image with structure (so truncation really loses data)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(height * 7919 + width)
    noise = rng.integers(0, 40, (height, width), dtype=np.int64)
    r = (x * 255 // max(width - 1, 1) + noise) % 256
    g = (y * 255 // max(height - 1, 1) + noise) % 256
    b = ((x + y) * 3 + noise) % 256
    return np.stack([r, g, b], axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_bomb(width: int = BOMB_SIDE, height: int = BOMB_SIDE) -> bytes:
    """A structurally valid PNG whose IHDR declares width x height but whose IDAT is tiny.

    Decoding it for real would need width*height*3 bytes (30 GB at the default side); the
    decoder must refuse it from the header alone.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _exif_rotated_jpeg() -> bytes:
    """A 40 (h) x 64 (w) JPEG whose EXIF Orientation=6 says "rotate 90 degrees" on display."""
    image = Image.fromarray(_gradient(40, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(image, "JPEG", quality=90, exif=exif.tobytes())


def hostile_corpus() -> list[Hostile]:
    """Every hostile kind the reliability issue names, generated in memory (deterministic)."""
    png = _encode(Image.fromarray(_gradient(96, 96)), "PNG")
    jpeg = _encode(Image.fromarray(_gradient(96, 96)), "JPEG", quality=90)
    cmyk = _encode(Image.fromarray(_gradient(48, 56)).convert("CMYK"), "JPEG", quality=90)
    palette = _encode(
        Image.fromarray(_gradient(50, 70)).convert("P", palette=Image.ADAPTIVE), "PNG"
    )
    rgba = np.dstack([_gradient(60, 44), np.full((60, 44), 128, np.uint8)])
    sixteen = (np.arange(52 * 66, dtype=np.uint32).reshape(52, 66) * 17 % 65536).astype(np.uint16)
    return [
        Hostile("zero_bytes.png", "zero bytes", b"", "empty_file"),
        Hostile("truncated.png", "truncated PNG", png[: len(png) // 2], "truncated"),
        Hostile("truncated.jpg", "truncated JPEG", jpeg[: len(jpeg) // 2], "truncated"),
        Hostile(
            "text.png", "text file named .png", b"hello, I am not a picture\n" * 4, "not_an_image"
        ),
        Hostile("bomb.png", "PNG bomb (100000x100000 declared)", png_bomb(), "too_large"),
        Hostile(
            "sixteen_bit.png",
            "16-bit PNG",
            _encode(Image.fromarray(sixteen), "PNG"),
            None,
            (52, 66),
        ),
        Hostile("cmyk.jpg", "CMYK JPEG", cmyk, None, (48, 56)),
        Hostile("palette.png", "palette PNG", palette, None, (50, 70)),
        Hostile(
            "rgba.png", "RGBA PNG", _encode(Image.fromarray(rgba, "RGBA"), "PNG"), None, (60, 44)
        ),
        Hostile("exif_rotated.jpg", "EXIF-rotated JPEG", _exif_rotated_jpeg(), None, (64, 40)),
        Hostile(
            "one_pixel.png",
            "1x1 PNG",
            _encode(Image.fromarray(np.full((1, 1, 3), 200, np.uint8)), "PNG"),
            None,
            (1, 1),
        ),
        Hostile(
            "one_pixel.jpg",
            "1x1 JPEG",
            _encode(Image.fromarray(np.full((1, 1, 3), 90, np.uint8)), "JPEG"),
            None,
            (1, 1),
        ),
        Hostile(
            "huge.png",
            "far larger than the model input (2000x1500)",
            _encode(Image.fromarray(_gradient(1500, 2000)), "PNG", compress_level=1),
            None,
            (1500, 2000),
        ),
        Hostile("jpeg_named.png", "JPEG content named .png", jpeg, None, (96, 96)),
        Hostile("png_named.jpg", "PNG content named .jpg", png, None, (96, 96)),
        *format_corpus(),
    ]


def _animated(fmt: str, **kwargs: object) -> bytes:
    first, second = Image.fromarray(_gradient(40, 52)), Image.fromarray(_gradient(40, 52)[::-1])
    buf = io.BytesIO()
    first.save(buf, format=fmt, save_all=True, append_images=[second], **kwargs)
    return buf.getvalue()


def format_corpus() -> list[Hostile]:
    """Valid images in every format beyond PNG/JPEG/BMP/TIFF that scoring accepts: each must
    become a scored row (animated files: their first frame)."""
    base = Image.fromarray(_gradient(44, 58))
    return [
        Hostile("lossless.webp", "WebP (lossless)", _encode(base, "WEBP", lossless=True), None,
                (44, 58)),
        Hostile("lossy.webp", "WebP (lossy)", _encode(base, "WEBP", quality=80), None, (44, 58)),
        Hostile("animated.webp", "animated WebP (first frame)", _animated("WEBP", duration=50),
                None, (40, 52)),
        Hostile("animated.gif", "animated GIF (first frame)", _animated("GIF", duration=50),
                None, (40, 52)),
        Hostile("image.ppm", "PPM", _encode(base, "PPM"), None, (44, 58)),
        Hostile("image.tga", "TGA", _encode(base, "TGA"), None, (44, 58)),
        Hostile("image.qoi", "QOI", _encode(base, "QOI"), None, (44, 58)),
        Hostile("image.jp2", "JPEG 2000", _encode(base, "JPEG2000"), None, (44, 58)),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def corpus() -> list[Hostile]:
    return hostile_corpus()


def test_corpus_covers_every_kind_once(corpus: list[Hostile]) -> None:
    names = [h.name for h in corpus]
    assert len(names) == len(set(names)) == 15 + len(format_corpus())
    assert {h.reason for h in corpus} == {
        None,
        "empty_file",
        "truncated",
        "not_an_image",
        "too_large",
    }


def test_each_file_decodes_or_fails_with_its_reason(corpus: list[Hostile]) -> None:
    for hostile in corpus:
        if hostile.reason is None:
            array = decode_image(hostile.data)
            assert array.shape[:2] == hostile.shape, hostile.name
            rgb = resize_image(array, 64)
            assert (rgb.shape, rgb.dtype) == ((64, 64, 3), np.uint8), hostile.name
        else:
            with pytest.raises(DecodeError) as info:
                decode_image(hostile.data)
            assert info.value.reason == hostile.reason, (hostile.name, str(info.value))
            assert str(info.value).startswith(f"{hostile.reason}: ")


def test_png_bomb_is_refused_from_the_header_without_allocating() -> None:
    """Refusal must not cost the declared 30 GB, nor even a few MB."""
    bomb = png_bomb()
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode_image(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert "pixel" in info.value.message  # says why: the declared size, not a codec failure
    assert peak < 4 * 2**20


def test_pixel_cap_is_configurable(corpus: list[Hostile]) -> None:
    """The cap is per call (ScoreJobConfig.max_pixels): a 2000x1500 image passes the default cap
    and is refused under a 1 Mpx cap; exactly at the cap is allowed."""
    huge = next(h for h in corpus if h.name == "huge.png")
    assert 2000 * 1500 < DEFAULT_MAX_PIXELS
    assert decode_image(huge.data).shape == (1500, 2000, 3)
    with pytest.raises(DecodeError) as info:
        decode_image(huge.data, max_pixels=1_000_000)
    assert info.value.reason == "too_large"
    assert decode_image(huge.data, max_pixels=2000 * 1500).shape == (1500, 2000, 3)


def test_modes_are_normalised_for_the_model(corpus: list[Hostile]) -> None:
    """16-bit keeps its precision until resize; CMYK and palette become RGB; RGBA keeps alpha
    in the decoded array (resize drops it); EXIF orientation is applied."""
    by_name = {h.name: h for h in corpus}
    assert decode_image(by_name["sixteen_bit.png"].data).dtype == np.uint16
    assert decode_image(by_name["cmyk.jpg"].data).shape == (48, 56, 3)
    assert decode_image(by_name["palette.png"].data).shape == (50, 70, 3)
    assert decode_image(by_name["rgba.png"].data).shape == (60, 44, 4)
    rotated = decode_image(by_name["exif_rotated.jpg"].data)
    assert rotated.shape == (64, 40, 3)


# --------------------------------------------------------------------------------------------
# Bad manifests and job configs: every problem names where it is (line and column / field).

MANIFEST_CASES: dict[str, tuple[str, list[str]]] = {
    "missing value": (
        "product_line,train_uri\nfoo,\n",
        ["line 2, column 'train_uri': required value is missing"],
    ),
    "not an integer": (
        "product_line,train_uri,image_size\nfoo,/d,abc\n",
        ["line 2, column 'image_size': 'abc' is not an integer"],
    ),
    "bad image size": (
        "product_line,train_uri,image_size\nfoo,/d,-5\n",
        ["line 2, column 'image_size': image_size must be a multiple of 32 and >= 32, got -5"],
    ),
    "bad epochs": (
        "product_line,train_uri,epochs\nfoo,/d,0\n",
        ["line 2, column 'epochs': epochs must be >= 1, got 0"],
    ),
    "unknown backbone": (
        "product_line,train_uri,backbone\nfoo,/d,resnet9000\n",
        [
            "line 2, column 'backbone': unknown backbone 'resnet9000'; known: vgg19, mobilenet_v2, "
            "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2"
        ],
    ),  # fmt: skip
    "unknown column": (
        "product_line,train_uri,colour\nfoo,/d,red\n",
        [
            "line 1, column 'colour': unknown column; allowed: product_line, train_uri, val_uri, "
            "test_uri, image_size, epochs, backbone, preset, layers, feature_norm, "
            "smoothing_sigma, image_score, topk_fraction, score_norm, global_weight, "
            "tile_overlap, tile_scale, max_tiles, tile, pixel_fpr, image_fpr"
        ],
    ),  # fmt: skip
    "missing column": (
        "product_line\nfoo\n",
        ["line 1, column 'train_uri': required column is missing"],
    ),
    "too many fields": (
        "product_line,train_uri\nfoo,/d,extra\n",
        ["line 2: 3 fields but the header has 2"],
    ),
    "unsupported scheme": (
        "product_line,train_uri\nfoo,ftp://x/y\n",
        [
            "line 2, column 'train_uri': unsupported URI scheme 'ftp' in 'ftp://x/y' "
            "(use s3://, file:// or a path)"
        ],
    ),  # fmt: skip
    "relative path in a remote manifest": (
        "product_line,train_uri\nfoo,x/y\n",
        [
            "line 2, column 'train_uri': relative path 'x/y' in a remote manifest: use an "
            "absolute URI"
        ],
    ),  # fmt: skip
    "problems on several lines": (
        "product_line,train_uri,epochs\nok,/d,1\n../up,/d,2\nok,/d,x\n",
        [
            "line 3, column 'product_line': unsafe product_line '../up': only letters, digits, "
            "'.', '_' and '-' allowed",
            "line 4, column 'epochs': 'x' is not an integer",
            "line 4, column 'product_line': duplicate product line 'ok' (first on line 2)",
        ],
    ),  # fmt: skip
    "empty file": ("", ["the file is empty"]),
    "header only": (
        "product_line,train_uri\n",
        ["no product lines: the manifest has only a header"],
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_malformed_manifest_names_line_and_column(case: str) -> None:
    from pipeline.manifest import ManifestError, parse_manifest

    text, expected = MANIFEST_CASES[case]
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, "s3://bucket/manifest.csv", None)
    assert [str(p) for p in info.value.problems] == expected
    assert "nothing was trained" in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_size", 0, "batch_size must be >= 1, got 0"),
        ("shard_size", -1, "shard_size must be >= 1, got -1"),
        ("run_date", "2024-13-01", "month must be in 1..12"),
        ("run_date", "yesterday", "run_date must be YYYY-MM-DD, got 'yesterday'"),
        ("masks", "some", "masks must be one of ('anomalous', 'all', 'none'), got 'some'"),
        ("max_error_fraction", 1.5, "max_error_fraction must be in [0, 1], got 1.5"),
        ("run_id", "../x", "unsafe run id '../x'"),
    ],
)
def test_malformed_score_config_names_the_field(field: str, value: object, message: str) -> None:
    from pipeline.score_job import ScoreJobConfig

    settings: dict[str, object] = dict(
        models_uri="m", input_uri="i", output_uri="o", run_date="2024-01-01"
    )
    settings[field] = value
    with pytest.raises(ValueError) as info:
        ScoreJobConfig(**settings)  # type: ignore[arg-type]
    assert message in str(info.value)
