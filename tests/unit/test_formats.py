"""Every image format the scoring job accepts decodes to the right pixels (pure unit tests).

One test per supported format (lossless ones must round-trip exactly, lossy ones closely),
first-frame semantics for animated files, the decompression-bomb cap for the newly accepted
formats, and formats deliberately left out staying ``unsupported_format``.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dfr_core.decode import SUPPORTED_FORMATS, DecodeError, decode_image
from dfr_core.preprocess import resize_image

H, W = 24, 36


def _gradient() -> np.ndarray:
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([x * 7 % 256, y * 10 % 256, (x + y) * 3 % 256], axis=2).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


#: format -> (save kwargs, max mean absolute error allowed against the original RGB pixels)
CASES = {
    "PNG": ({}, 0.0),
    "BMP": ({}, 0.0),
    "TIFF": ({}, 0.0),
    "PPM": ({}, 0.0),
    "TGA": ({}, 0.0),
    "QOI": ({}, 0.0),
    "WEBP": ({"lossless": True}, 0.0),
    "JPEG2000": ({"irreversible": False}, 0.0),
    "JPEG": ({"quality": 95}, 6.0),
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_format_decodes_to_its_pixels(fmt):
    kwargs, tolerance = CASES[fmt]
    original = _gradient()
    array = decode_image(_encode(original, fmt, **kwargs))
    assert array.shape == (H, W, 3) and array.dtype == np.uint8
    assert np.abs(array.astype(float) - original).mean() <= tolerance
    assert resize_image(array, 32).shape[:2] == (32, 32)


def test_lossy_webp_decodes():
    array = decode_image(_encode(_gradient(), "WEBP", quality=90))
    assert array.shape == (H, W, 3)
    assert np.abs(array.astype(float) - _gradient()).mean() < 12


def _frames(fmt: str, **kwargs: object) -> tuple[bytes, np.ndarray]:
    first = _gradient()
    second = 255 - first
    buf = io.BytesIO()
    frames = [Image.fromarray(first), Image.fromarray(second)]
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], **kwargs)
    return buf.getvalue(), first


def test_animated_gif_gives_its_first_frame():
    data, first = _frames("GIF", duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    array = decode_image(data)
    assert array.shape[:2] == (H, W) and array.shape[2] in (3, 4)
    # GIF is palette-quantised: the first frame, not the inverted second one.
    error_first = np.abs(array[..., :3].astype(float) - first).mean()
    error_second = np.abs(array[..., :3].astype(float) - (255 - first)).mean()
    assert error_first < 20 < error_second


def test_grayscale_gif_decodes():
    gray = np.tile(np.arange(W, dtype=np.uint8) * 7, (H, 1))
    array = decode_image(_encode(gray, "GIF"))
    assert array.shape[:2] == (H, W)
    assert resize_image(array, 16).shape[:2] == (16, 16)


def test_animated_webp_gives_its_first_frame():
    data, first = _frames("WEBP", lossless=True, duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    array = decode_image(data)
    assert np.abs(array[..., :3].astype(float) - first).mean() < 1.0


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "QOI", "TGA"])
def test_pixel_cap_applies_to_new_formats(fmt):
    data = _encode(_gradient(), fmt)
    with pytest.raises(DecodeError) as info:
        decode_image(data, max_pixels=H * W - 1)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("fmt", ["PCX", "ICO", "SGI"])
def test_formats_left_out_stay_unsupported(fmt):
    assert fmt not in SUPPORTED_FORMATS
    with pytest.raises(DecodeError) as info:
        decode_image(_encode(_gradient(), fmt))
    assert info.value.reason == "unsupported_format"
