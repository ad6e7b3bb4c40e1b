"""Decoding untrusted image bytes into arrays, with a specific reason for every failure.

Training and scoring both decode through here, so a corrupt file is reported the same way
everywhere: as a DecodeError whose `reason` becomes the error row's reason code.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # a decompression-bomb cap; configurable per job
#: Formats Pillow decodes with maintained, fuzzed decoders (PIL's own or libjpeg/libpng/libtiff/
#: libwebp/openjpeg). Animated GIF/WebP/MPO give their first frame (Pillow opens frame 0).
#: Left out on purpose: EPS (runs Ghostscript), PSD/ICO/PCX/SGI/DDS/IM/FLI and other rarely used
#: plugins, which stay ``unsupported_format`` rows. The pixel cap is checked from the header
#: before any pixel is decoded, for every format.
SUPPORTED_FORMATS = (
    "PNG", "JPEG", "MPO", "BMP", "TIFF", "WEBP", "GIF", "PPM", "TGA", "QOI", "JPEG2000",
)  # fmt: skip


class DecodeError(ValueError):
    """An input that is not a usable image. `reason` is a short stable code for analytics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _to_array(im: Image.Image) -> np.ndarray:
    """PIL image -> HxW, HxWx3 or HxWx4 array; CMYK, palette and 16-bit modes normalised."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.int64 if im.mode == "I" else np.uint16)
        if arr.dtype != np.uint16:
            arr = np.clip(arr, 0, 65535).astype(np.uint16)
        return arr
    if im.mode == "F":
        return np.asarray(im, dtype=np.float32)
    if im.mode in ("L", "RGB", "RGBA"):
        return np.asarray(im)
    has_alpha = im.mode in ("LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Bytes -> array (EXIF orientation applied). Raises DecodeError with a specific reason:
    empty_file, not_an_image, unsupported_format, too_large, truncated, decode_error."""
    if not data:
        raise DecodeError("empty_file", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            fmt = im.format or "unknown"
            if fmt not in SUPPORTED_FORMATS:
                raise DecodeError("unsupported_format", f"format {fmt} is not supported")
            w, h = im.size
            if w < 1 or h < 1:
                raise DecodeError("decode_error", f"degenerate size {w}x{h}")
            if w * h > max_pixels:
                raise DecodeError("too_large", f"{w}x{h} exceeds the {max_pixels} pixel cap")
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_array(im)
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", "content is not a recognised image") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", str(exc)) from exc
    except OSError as exc:
        text = str(exc)
        reason = (
            "truncated" if "truncat" in text.lower() or "broken data" in text else "decode_error"
        )
        raise DecodeError(reason, text) from exc
    except (ValueError, SyntaxError, MemoryError) as exc:
        raise DecodeError("decode_error", f"{type(exc).__name__}: {exc}") from exc
