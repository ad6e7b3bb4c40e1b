"""dfr_core.decode is the one decoder: camera-depth PNGs and float TIFFs give the same model
pixels in training, evaluation, the benchmarks' reader and the scoring decode stage, scaled by
the image's real bit depth."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, PngImagePlugin

from dfr_core import datasets
from dfr_core.decode import (
    DecodeError,
    DecodeReason,
    decode_image,
    decode_mask,
    decode_resized,
    png_significant_bits,
)
from pipeline.image_sets import load_images
from pipeline.io_stages import DecodeConfig, ReadConfig, decode_batch, read_batch
from pipeline.mvtec_remote import load_labelled_set

H, W, SIZE = 40, 48, 32


def _png16(values: np.ndarray, sbit: int | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, "PNG", pnginfo=info)
    return buf.getvalue()


def _ramp(top: int) -> np.ndarray:
    """A gray ramp over 0..top (every column a different level)."""
    return np.round(np.tile(np.linspace(0, top, W), (H, 1))).astype(np.int64)


def _tiff_float(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), mode="F").save(buf, "TIFF")
    return buf.getvalue()


CAMERA = {
    "twelve_bit.png": (_png16(_ramp(4095)), _ramp(4095) / 4095),
    "twelve_bit_sbit.png": (_png16(_ramp(3000), sbit=12), _ramp(3000) / 4095),
    "sixteen_bit.png": (_png16(_ramp(65535)), _ramp(65535) / 65535),
    "float.tiff": (_tiff_float(np.tile(np.linspace(0, 1, W), (H, 1))), None),
}


@pytest.fixture(scope="module")
def camera_dir(tmp_path_factory) -> Path:
    """The images in MVTec layout (test/good), as training, evaluation and scoring read them."""
    root = tmp_path_factory.mktemp("camera")
    (root / "test" / "good").mkdir(parents=True)
    for name, (data, _) in CAMERA.items():
        (root / "test" / "good" / name).write_bytes(data)
    return root


def _scoring_pixels(uris: list[str]) -> list[np.ndarray]:
    n = len(uris)
    table = pa.table(
        {
            "image_uri": uris,
            "product_line": ["p"] * n,
            "status": ["ok"] * n,
            "error_reason": pa.nulls(n, pa.string()),
            "error": pa.nulls(n, pa.string()),
        }
    )
    out = decode_batch(
        read_batch(table, ReadConfig(None, 2, 10**7)), DecodeConfig({"p": SIZE}, 10**7)
    )
    assert out.column("status").to_pylist() == ["ok"] * n, out.column("error").to_pylist()
    return [
        np.frombuffer(p, np.uint8).reshape(SIZE, SIZE, 3) for p in out.column("pixels").to_pylist()
    ]


def test_every_path_decodes_the_same_pixels(camera_dir):
    names = sorted(CAMERA)
    paths = [camera_dir / "test" / "good" / n for n in names]
    reference = [decode_resized(CAMERA[n][0], SIZE).pixels for n in names]
    benchmark = datasets.load_images(paths, SIZE)  # benchmarks/accuracy.py, real-data tests
    training = load_images([str(p) for p in paths], SIZE)  # the training task
    assert not training.failures
    evaluation = load_labelled_set(str(camera_dir), SIZE)  # `dfr-pipeline evaluate`, the gate
    by_uri = dict(zip((s.image_uri for s in evaluation.samples), evaluation.images, strict=True))
    scoring = _scoring_pixels([str(p) for p in paths])  # the scoring decode stage
    for i, name in enumerate(names):
        for path_name, pixels in (
            ("benchmark", benchmark[i]),
            ("training", training.images[i]),
            ("evaluation", by_uri[str(paths[i])]),
            ("scoring", scoring[i]),
        ):
            assert np.array_equal(pixels, reference[i]), (name, path_name)


@pytest.mark.parametrize("name", sorted(n for n, (_, v) in CAMERA.items() if v is not None))
def test_deep_pngs_scale_by_their_real_bit_depth(name):
    data, expected = CAMERA[name]
    full = decode_image(data)
    assert full.dtype == np.uint16
    eight = (full >> 8).astype(np.int64)  # what the model stage makes of the full-range data
    assert np.abs(eight - np.round(expected * 255)).max() <= 1, name


def test_a_twelve_bit_image_keeps_its_gray_levels():
    """uint16 >> 8 would leave a 12-bit ramp 16 gray levels; the decoder keeps all 256."""
    data, _ = CAMERA["twelve_bit.png"]
    naive = np.unique(np.asarray(Image.open(io.BytesIO(data))) >> 8)
    assert len(naive) == 16
    assert len(np.unique(decode_image(data) >> 8)) >= 40  # one level per column of the ramp (48)


def test_sbit_is_read_and_a_wrong_one_is_ignored():
    assert png_significant_bits(CAMERA["twelve_bit_sbit.png"][0]) == 12
    assert png_significant_bits(CAMERA["twelve_bit.png"][0]) is None
    assert png_significant_bits(b"not a png") is None
    lying = _png16(_ramp(65535), sbit=8)  # values above 8 bits: the chunk is wrong
    assert decode_image(lying).max() == 65535


def test_a_float_tiff_is_read_as_zero_to_one():
    data = _tiff_float(np.array([[0.0, 0.5, 1.0, np.nan]] * 4))
    array = decode_image(data)
    assert array.dtype == np.float32
    assert np.array_equal(decode_resized(data, 4).pixels[0, :, 0], [0, 128, 255, 0])


def test_reason_codes_are_a_strenum():
    with pytest.raises(DecodeError) as info:
        decode_image(b"")
    assert info.value.reason is DecodeReason.EMPTY_FILE and info.value.reason == "empty_file"
    with pytest.raises(DecodeError) as info:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert info.value.reason is DecodeReason.NOT_AN_IMAGE


def test_masks_binarise_and_resize():
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")
    out = decode_mask(buf.getvalue(), 4)
    assert out.dtype == bool and out.shape == (4, 4)
    assert out[:2].all() and not out[2:].any()
