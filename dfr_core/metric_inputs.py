"""Input handling shared by the metrics: arrays or torch tensors in, validated numpy out.

Used by :mod:`dfr_core.metrics` (AUROC, fixed-threshold scores) and :mod:`dfr_core.pro`
(PRO / AUPRO); not a public API of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """Accept torch tensors (any device, with grad) without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_binary(x: Any, name: str) -> np.ndarray:
    """Bool view of 0/1 labels; anything else (e.g. 0/255 masks) is rejected, not guessed at."""
    a = to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be binary (0/1 or bool), got dtype {a.dtype}")
    if not ((a == 0) | (a == 1)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool); found other values")
    return a.astype(bool)


def as_scores(x: Any, name: str) -> np.ndarray:
    """Float scores without NaN; float32 is kept so 20M-pixel stacks are not doubled in memory."""
    a = to_numpy(x)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN; a NaN score has no rank")
    return a


def same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    """Shape errors name both shapes: the usual cause is a transposed or unbatched array."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} shape {a.shape} does not match {b_name} shape {b.shape}")
    if a.size == 0:
        raise ValueError(f"{a_name} shape {a.shape} and {b_name} shape {b.shape} are empty")


def pixel_pair(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(N, H, W)`` bool masks and float maps; a single ``(H, W)`` image is allowed."""
    m, s = to_numpy(masks), to_numpy(maps)
    same_shape(m, s, "masks", "maps")
    if m.ndim == 2:
        m, s = m[None], s[None]
    if m.ndim != 3:
        raise ValueError(f"masks/maps must be (N, H, W) or (H, W), got shape {m.shape}")
    return as_binary(m, "masks"), as_scores(s, "maps")


def count_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of entries strictly above each threshold (``sorted_scores`` ascending)."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="right")
