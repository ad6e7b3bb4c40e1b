"""Antialiased bilinear resize in numpy alone, so decode workers never import torch.

This reproduces ``torch.nn.functional.interpolate(x.float(), mode="bilinear",
align_corners=False, antialias=True)`` followed by round-half-even and a uint8 clamp (what
`dfr_core.preprocess.resize_image` computed before): the same triangle filter widened by the
downscale factor, the same per-output tap ranges and normalised weights, computed in float32,
the horizontal pass first, then the vertical one, each tap accumulated in order with a fused
multiply-add, as ATen's vectorised kernel does.
`tests/unit/test_resize.py` compares the pixels with torch's on many sizes.

Importing torch costs about 1 GB of RSS per Ray worker (its CUDA build), which is why the
read/decode stages use this module and `dfr_core.preprocess` re-exports it.
"""

from __future__ import annotations

import numpy as np


def _taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """(n_out, K) source indices and float32 weights of the antialiased triangle filter.

    Follows ATen's ``_compute_indices_min_size_weights_aa`` (interp_size 2, align_corners
    False) operation by operation, including which steps round to float32: scale = n_in / n_out,
    support = scale (downscaling) or 1, centre = scale * (i + 0.5), taps
    [int(centre - support + 0.5), int(centre + support + 0.5)) clipped to the input, weight =
    max(0, 1 - |(j - centre + 0.5) / max(scale, 1)|), normalised by their sequential sum.
    Unused tap slots get weight 0 and index 0.
    """
    f32, f64 = np.float32, np.float64
    scale = f32(f32(n_in) / f32(n_out))
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0 / f64(scale)) if scale >= 1.0 else f32(1.0)
    i = np.arange(n_out, dtype=f64)
    center = (f64(scale) * (i + 0.5)).astype(f32)
    xmin = np.maximum(((center - support).astype(f64) + 0.5).astype(np.int64), 0)
    xmax = np.minimum(((center + support).astype(f64) + 0.5).astype(np.int64), n_in)
    k = int((xmax - xmin).max())
    idx = xmin[:, None] + np.arange(k, dtype=np.int64)[None, :]
    valid = idx < xmax[:, None]
    x = ((idx.astype(f32) - center[:, None]).astype(f64) + 0.5) * f64(invscale)
    x = np.abs(x.astype(f32))
    w = np.where(valid & (x < 1.0), f32(1.0) - x, f32(0.0)).astype(f32)
    total = np.zeros(n_out, dtype=f32)
    for t in range(k):  # sequential float32 sum, as ATen accumulates it
        total = (total + w[:, t]).astype(f32)
    safe = np.where(total == 0, f32(1.0), total)[:, None]
    w = np.where(total[:, None] != 0, w / safe, w).astype(f32)
    return np.where(valid, idx, 0), w


def _resample_axis(src: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """Resample float32 ``src`` along ``axis`` to ``n_out`` samples (taps accumulated in order)."""
    n_in = src.shape[axis]
    if n_in == n_out:
        return src
    idx, w = _taps(n_in, n_out)
    src = np.moveaxis(src, axis, 0)
    shape = (n_out,) + (1,) * (src.ndim - 1)
    w64 = w.astype(np.float64)
    acc = src[idx[:, 0]] * w[:, 0].reshape(shape)
    for t in range(1, idx.shape[1]):
        # ATen's vectorised loop fuses multiply and add (FMA): the float32 product is exact in
        # float64, so one float64 multiply-add rounded to float32 gives the same bits.
        prod = src[idx[:, t]].astype(np.float64) * w64[:, t].reshape(shape)
        acc = (prod + acc).astype(np.float32)
    return np.moveaxis(acc, 0, axis)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_rgb_uint8(rgb: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> size x size x 3 (or, for size (h, w), h x w x 3) uint8, antialiased
    bilinear (see the module docstring)."""
    out_h, out_w = _hw(size)
    if rgb.shape[0] == out_h and rgb.shape[1] == out_w:
        return np.ascontiguousarray(rgb)
    x = rgb.astype(np.float32)
    x = _resample_axis(x, out_w, axis=1)  # horizontal pass first, as ATen does
    x = _resample_axis(x, out_h, axis=0)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a decoded image array to HxWx3 uint8.

    Accepts grayscale (HxW or HxWx1), RGB, RGBA (alpha dropped) and 16-bit or float data, since
    industrial cameras produce all of these; anything else is a ValueError naming the shape.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"unsupported image array shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        top = max(int(arr.max()), 1)
        return (arr.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize any decoded image to the model's size x size (or (H, W)) RGB uint8 input.

    Antialiased bilinear, so that large archive images are downsampled without aliasing; the
    result stays uint8 so the decode stage ships 4x fewer bytes to the model stage.
    """
    return resize_rgb_uint8(to_rgb_uint8(image), size)
