"""THE image decoder: untrusted bytes -> array, with a specific reason for every failure.

Training, evaluation, the benchmarks, the report and the scoring decode stage all decode here,
so a model sees the same pixels wherever an image comes from, and a corrupt file is reported
the same way everywhere: a DecodeError whose ``reason`` (a `DecodeReason`) becomes the error
row's reason code.

Deep images keep their depth in the array (uint16, float32) and are scaled by their *real* bit
depth: a 12-bit camera image stored in 16 bits is stretched to the full 16-bit range here, so
the later conversion to 8 bits (`dfr_core.resize.to_rgb_uint8`, ``>> 8``) keeps its 256 gray
levels instead of collapsing to 16. The real depth is the PNG ``sBIT`` chunk when the file has
one; otherwise 12 bits when every value fits in 12 bits (the common machine-vision depth; 10-bit
data then keeps 64 levels), else 16. Float images (TIFF mode "F") are taken as 0..1 (NaN = 0).

Imports only numpy and Pillow: the decode workers of the scoring job never import torch.
"""

from __future__ import annotations

import io
import struct
import warnings
from enum import StrEnum
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dfr_core.resize import resize_image, to_rgb_uint8

DEFAULT_MAX_PIXELS = 64_000_000  # a decompression-bomb cap; configurable per job
#: Formats Pillow decodes with maintained, fuzzed decoders (PIL's own or libjpeg/libpng/libtiff/
#: libwebp/openjpeg). Animated GIF/WebP/MPO give their first frame (Pillow opens frame 0).
#: Left out on purpose: EPS (runs Ghostscript), PSD/ICO/PCX/SGI/DDS/IM/FLI and other rarely used
#: plugins, which stay ``unsupported_format`` rows. The pixel cap is checked from the header
#: before any pixel is decoded, for every format.
SUPPORTED_FORMATS = (
    "PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA", "QOI", "JPEG2000",
)  # fmt: skip
#: The depth assumed for 16-bit data without an sBIT chunk whose values all fit in it.
CAMERA_BITS = 12
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class DecodeReason(StrEnum):
    """Why bytes are not a usable image (stable codes: they are error rows' reasons)."""

    EMPTY_FILE = "empty_file"
    NOT_AN_IMAGE = "not_an_image"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TOO_LARGE = "too_large"
    TRUNCATED = "truncated"
    DECODE_ERROR = "decode_error"


class DecodeError(ValueError):
    """An input that is not a usable image. `reason` is a short stable code for analytics."""

    def __init__(self, reason: DecodeReason, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = DecodeReason(reason)
        self.message = message


class Decoded(NamedTuple):
    """An image at the model's size, and the size it had."""

    pixels: np.ndarray  # (S, S, 3) uint8
    height: int
    width: int


def png_significant_bits(data: bytes) -> int | None:
    """The PNG sBIT chunk's depth (the largest over channels), or None when there is none.

    Walks the chunks before the first IDAT (sBIT must precede it); Pillow does not expose it.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind == b"IDAT":
            return None
        if kind == b"sBIT":
            bits = data[pos + 8 : pos + 8 + min(length, 4)]
            return max(bits) if bits else None
        pos += 12 + length  # length, type, data, crc
    return None


def _full_range_uint16(arr: np.ndarray, declared_bits: int | None) -> np.ndarray:
    """16-bit container data -> uint16 scaled from its real bit depth to the full range."""
    arr = np.clip(arr, 0, 65535).astype(np.uint16) if arr.dtype != np.uint16 else arr
    top = int(arr.max()) if arr.size else 0
    bits = declared_bits if declared_bits and 0 < declared_bits < 16 else None
    if bits is None or top >= 1 << bits:  # no (or a wrong) sBIT: infer from the values
        bits = CAMERA_BITS if top < 1 << CAMERA_BITS else 16
    if bits >= 16:
        return arr
    peak = (1 << bits) - 1
    scaled = (arr.astype(np.uint32) * 65535 + peak // 2) // peak
    return scaled.astype(np.uint16)


def _to_array(im: Image.Image, data: bytes) -> np.ndarray:
    """PIL image -> HxW, HxWx3 or HxWx4 array; CMYK, palette and 16-bit modes normalised."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.int64 if im.mode == "I" else np.uint16)
        return _full_range_uint16(arr, png_significant_bits(data))
    if im.mode == "F":
        return np.nan_to_num(np.asarray(im, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    if im.mode in ("L", "RGB", "RGBA"):
        return np.asarray(im)
    has_alpha = im.mode in ("LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> array (EXIF orientation applied, deep data at full range). Raises DecodeError
    with a specific reason: empty_file, not_an_image, unsupported_format, too_large, truncated,
    decode_error."""
    if not data:
        raise DecodeError(DecodeReason.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            if fmt not in SUPPORTED_FORMATS:
                raise DecodeError(DecodeReason.UNSUPPORTED_FORMAT, f"format {fmt} is not supported")
            w, h = im.size
            if w < 1 or h < 1:
                raise DecodeError(DecodeReason.DECODE_ERROR, f"degenerate size {w}x{h}")
            if w * h > max_pixels:
                raise DecodeError(
                    DecodeReason.TOO_LARGE, f"{w}x{h} exceeds the {max_pixels} pixel cap"
                )
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_array(im, data)
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError(DecodeReason.NOT_AN_IMAGE, "content is not a recognised image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(DecodeReason.TOO_LARGE, str(exc)) from exc
    except OSError as exc:
        text = str(exc)
        truncated = "truncat" in text.lower() or "broken data" in text
        reason = DecodeReason.TRUNCATED if truncated else DecodeReason.DECODE_ERROR
        raise DecodeError(reason, text) from exc
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise DecodeError(DecodeReason.DECODE_ERROR, f"{type(exc).__name__}: {exc}") from exc


def header_size(data: bytes) -> tuple[int, int] | None:
    """The (height, width) the header declares, or None when the header cannot tell
    (decode_image then names the problem). No pixel is decoded.

    EXIF orientation is NOT applied (reading it may decode the whole image, e.g. a PNG's eXIf
    chunk after its pixels): decode_image may return the transposed size. Lets a caller refuse
    an image by a size rule that does not depend on it (a tiled model's tile count and minimum
    side are the same for both orientations) before decoding; a hint, never a verdict.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Exception:  # any unreadable header: decode_image gives the specific reason
        return None
    return height, width


def decode_resized(
    data: bytes, size: int | tuple[int, int], max_pixels: int = DEFAULT_MAX_PIXELS
) -> Decoded:
    """Bytes -> the model's (size, size, 3) uint8 input and the original height and width:
    the one path from a stored image to model pixels (training, evaluation, scoring)."""
    array = decode_image(data, max_pixels)
    try:
        pixels = resize_image(array, size)
    except ValueError as exc:  # decoded, but not an image layout the model can take
        raise DecodeError(DecodeReason.UNSUPPORTED_FORMAT, str(exc)) from exc
    return Decoded(pixels, int(array.shape[0]), int(array.shape[1]))


def decode_mask(data: bytes, size: int | tuple[int, int]) -> np.ndarray:
    """Ground-truth mask bytes -> (size, size) (or (H, W)) bool: a pixel is defective when any
    channel is above half range (8-bit scale), resized with nearest neighbour."""
    array = decode_image(data)
    gray = to_rgb_uint8(array).max(axis=2) > 127
    h, w = (size, size) if isinstance(size, int) else size
    resized = Image.fromarray(gray).resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(resized, dtype=bool)
