"""The gallery's pictures: each scored image's original, heatmap overlay and mask outline,
downscaled and inlined as ``data:`` URIs (the report is one self-contained file).

The stored mask and heatmap are at the original image's size (the scoring job writes them
from the full-resolution map, stitched from tiles for a tiled model); they are reduced here
so that a defect of a few pixels in a large image stays visible: the outline keeps any covered
pixel, the heatmap each block's hottest pixel.

Never crash on one bad object: an unreadable original, a missing mask or heatmap becomes a
Panel with a note instead of a picture.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from dfr_core.decode import DecodeError, decode_image
from dfr_core.resize import to_rgb_uint8
from pipeline import storage
from pipeline.report.inputs import ReportConfig, short_error
from pipeline.storage import StorageOptions

_OUTLINE_RGB = (255, 48, 48)
_MASK_TINT_RGB = (255, 40, 40)
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Panel:
    """One picture of a gallery item, or (``src`` None) a note saying why there is none."""

    caption: str
    src: str | None
    note: str = ""


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return data_uri(buf.getvalue(), "image/jpeg")


def _load_rgb(uri: str, options: StorageOptions | None) -> np.ndarray:
    """Read and decode an image the same way the scoring job does, as (H, W, 3) uint8 (so a
    16-bit or grayscale camera image looks as the model saw it)."""
    return to_rgb_uint8(decode_image(storage.read_bytes(uri, options)))


def _thumbnail(rgb: np.ndarray, px: int) -> Image.Image:
    """The original at a viewable size: its long side capped at ``px``, its aspect kept (a
    500 x 1250 part stays long and thin; its mask and heatmap are fitted to this size)."""
    image = Image.fromarray(rgb, mode="RGB")
    image.thumbnail((px, px), Image.Resampling.LANCZOS)
    return image


def _load_mask(uri: str, size: tuple[int, int], options: StorageOptions | None) -> np.ndarray:
    """The stored 0/255 mask at thumbnail ``size`` as bool; any covered pixel survives the
    downscale (box filter, then > 0), so a thin scratch does not vanish from the outline."""
    mask = decode_image(storage.read_bytes(uri, options))
    if mask.ndim == 3:
        mask = mask[..., 0]
    image = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize(size, Image.Resampling.BOX)) > 0


def _heatmap_candidates(row: pd.Series) -> list[str]:
    """Where a heatmap may be: the row's ``heatmap_uri``, else beside the mask under either
    naming convention (``{id}.heatmap.png``, pipeline/output_layout.py's name, or
    ``{id}_heatmap.png``)."""
    stored = row.get("heatmap_uri")
    if isinstance(stored, str) and stored:
        return [stored]
    mask = row.get("mask_uri")
    if not isinstance(mask, str) or not mask.endswith(".png"):
        return []
    stem = mask[: -len(".png")]
    return [f"{stem}.heatmap.png", f"{stem}_heatmap.png"]


def shrink_heatmap(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """A full-resolution heatmap (H, W, 3) -> ``size`` (width, height) keeping its peaks.

    A plain resize averages: a 10 px hot spot of a 4000 px tiled image would fade into the
    background of a 256 px thumbnail. Each block of the integer reduction keeps its hottest
    pixel (the brightest: the colour map rises in luminance with the score), then a bilinear
    resize covers the rest of the way.
    """
    height, width = rgb.shape[:2]
    fy, fx = max(1, height // size[1]), max(1, width // size[0])
    if fy > 1 or fx > 1:
        h, w = height // fy * fy, width // fx * fx
        blocks = rgb[:h, :w].reshape(h // fy, fy, w // fx, fx, 3).transpose(0, 2, 1, 3, 4)
        blocks = blocks.reshape(h // fy, w // fx, fy * fx, 3)
        luma = blocks.astype(np.float32) @ np.asarray(_LUMA, np.float32)
        hottest = luma.argmax(axis=2)[..., None, None]
        rgb = np.take_along_axis(blocks, hottest, axis=2)[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(rgb), mode="RGB").resize(
        size, Image.Resampling.BILINEAR
    )


def _load_heatmap(
    row: pd.Series, size: tuple[int, int], options: StorageOptions | None
) -> Image.Image | None:
    for uri in _heatmap_candidates(row):
        try:
            rgb = _load_rgb(uri, options)
        except (OSError, DecodeError, ValueError):
            continue  # no heatmap stored (optional), or an unreadable one: use the mask
        return shrink_heatmap(rgb, size)
    return None


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask, thickened to about 2 px so it shows on a thumbnail."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    eroded = np.asarray(image.filter(ImageFilter.MinFilter(3))) > 0
    edge = mask & ~eroded
    edge_image = Image.fromarray(np.where(edge, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(edge_image.filter(ImageFilter.MaxFilter(3))) > 0


def _paint(thumb: Image.Image, where: np.ndarray, rgb: tuple[int, int, int], alpha: float):
    arr = np.asarray(thumb, dtype=np.float32).copy()
    arr[where] = (1.0 - alpha) * arr[where] + alpha * np.asarray(rgb, dtype=np.float32)
    return Image.fromarray((arr + 0.5).clip(0, 255).astype(np.uint8), mode="RGB")


def _overlay_panel(thumb: Image.Image, heat: Image.Image | None, mask: np.ndarray | None) -> Panel:
    if heat is not None:
        return Panel("heatmap overlay", _jpeg_uri(Image.blend(thumb, heat, 0.5)))
    if mask is not None:
        tinted = _paint(thumb, mask, _MASK_TINT_RGB, 0.45)
        return Panel("mask overlay (no heatmap stored)", _jpeg_uri(tinted))
    return Panel("heatmap overlay", None, "no heatmap or mask stored for this image")


def _outline_panel(thumb: Image.Image, mask: np.ndarray | None, mask_note: str) -> Panel:
    if mask is None:
        return Panel("mask outline", None, mask_note)
    if not mask.any():
        return Panel("mask outline (empty mask)", _jpeg_uri(thumb))
    return Panel("mask outline", _jpeg_uri(_paint(thumb, _outline(mask), _OUTLINE_RGB, 1.0)))


def gallery_panels(row: pd.Series, config: ReportConfig) -> tuple[Panel, ...]:
    """Original, heatmap overlay and mask outline of one scored image, each downscaled."""
    options = config.storage
    try:
        thumb = _thumbnail(_load_rgb(str(row["image_uri"]), options), config.thumb_px)
    except (OSError, DecodeError, ValueError) as exc:
        note = f"original unavailable: {short_error(exc)}"
        return (Panel("original", None, note),)
    mask, mask_note = None, "no mask stored for this image"
    mask_uri = row.get("mask_uri")
    if isinstance(mask_uri, str) and mask_uri:
        try:
            mask = _load_mask(mask_uri, thumb.size, options)
        except (OSError, DecodeError, ValueError) as exc:
            mask_note = f"mask unavailable: {short_error(exc)}"
    heat = _load_heatmap(row, thumb.size, options)
    return (
        Panel("original", _jpeg_uri(thumb)),
        _overlay_panel(thumb, heat, mask),
        _outline_panel(thumb, mask, mask_note),
    )
