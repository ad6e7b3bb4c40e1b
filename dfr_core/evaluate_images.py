"""Evaluating per-image maps of any size against ground-truth masks at the ORIGINAL resolution.

Tiled and HxW models give one map per image (`ImageOutput`, at the plan's map_hw: the scaled
image for a tiled model, input_hw otherwise). Each map is upsampled (bilinear) to its mask's
original (H, W), the size the scoring job writes masks at, and the pixel metrics (pixel AUROC,
PRO, F1/IoU at the calibrated threshold) pool every image's pixels, as MVTec AD does.
``size`` instead resizes both to one common (H, W) first (map bilinear, mask nearest), e.g.
256 x 256 for figures comparable with results computed at that resolution.

Memory stays bounded for large images: one image's full-resolution map at a time; all defect
pixels are kept (they make PRO and the AUROC's positives), while normal pixels are thinned by
one common stride so that at most ``max_normal`` are pooled (the F1/IoU counts are exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dfr_core import metrics
from dfr_core.calibrate import Calibration
from dfr_core.evaluate import EvalResult
from dfr_core.inference import ImageOutput
from dfr_core.pro import aupro_from_parts, label_components

#: Normal pixels pooled at most (20M float32: 80 MB); beyond, a common stride thins them.
MAX_NORMAL_PIXELS = 20_000_000


def map_at(amap: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """An (h, w) map resized bilinearly (align_corners False) to hw, float32 numpy."""
    if tuple(amap.shape) == tuple(hw):
        return amap.float().numpy()
    out = F.interpolate(amap.float()[None, None], size=hw, mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def mask_at(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A bool mask resized with nearest neighbour (as dfr_core.decode.decode_mask) to hw."""
    if mask.shape == tuple(hw):
        return mask.astype(bool)
    img = Image.fromarray(mask.astype(bool)).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
    return np.asarray(img, dtype=bool)


class PixelPool(NamedTuple):
    """Pooled pixels of the images whose masks are known."""

    defect_scores: np.ndarray  # every defect pixel's score (float32)
    defect_weights: np.ndarray  # 1 / (|region| * n_regions) per defect pixel (PRO)
    normal_scores: np.ndarray  # normal pixels, thinned by `stride`
    stride: int
    counts: tuple[int, int, int] | None  # exact (tp, fp, fn) at the threshold, if given


def _target(out: ImageOutput, mask: np.ndarray, size: tuple[int, int] | None) -> tuple[int, int]:
    return tuple(size) if size is not None else (int(mask.shape[0]), int(mask.shape[1]))


def pool_pixels(
    outs: Sequence[ImageOutput],
    masks: Sequence[np.ndarray | None],
    size: tuple[int, int] | None = None,
    threshold: float | None = None,
    max_normal: int = MAX_NORMAL_PIXELS,
) -> PixelPool:
    """Pool the pixels of every image with a known mask (None: pixels unknown, skipped)."""
    pairs = [(o, m) for o, m in zip(outs, masks, strict=True) if m is not None]
    normals = 0
    for out, mask in pairs:
        hw = _target(out, mask, size)
        normals += hw[0] * hw[1] - int(mask_at(mask, hw).sum())
    stride = max(1, math.ceil(normals / max_normal))
    defect, region, neg = [], [], []
    n_regions, tp, fp, fn = 0, 0, 0, 0
    for out, mask in pairs:
        hw = _target(out, mask, size)
        scores, m = map_at(out.anomaly_map, hw), mask_at(mask, hw)
        labels, count = label_components(m)
        defect.append(scores[m])
        region.append(labels[m].astype(np.int64) + n_regions)
        n_regions += count
        neg.append(scores[~m][::stride])
        if threshold is not None:
            hit = scores > np.float64(threshold)  # float64 compare: exactly "> threshold"
            tp, fp, fn = (
                tp + int((hit & m).sum()),
                fp + int((hit & ~m).sum()),
                fn + int((~hit & m).sum()),
            )
    ids = np.concatenate(region) if region else np.zeros(0, np.int64)
    sizes = np.bincount(ids, minlength=n_regions + 1)
    weights = 1.0 / (sizes[ids] * max(n_regions, 1))
    return PixelPool(
        np.concatenate(defect) if defect else np.zeros(0, np.float32),
        weights,
        np.concatenate(neg) if neg else np.zeros(0, np.float32),
        stride,
        None if threshold is None else (tp, fp, fn),
    )


def _safe(fn, *args) -> float | None:
    try:
        return float(fn(*args))
    except ValueError:
        return None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate_image_outputs(
    outs: Sequence[ImageOutput],
    masks: Sequence[np.ndarray | None],
    labels: np.ndarray,
    calibration: Calibration | None = None,
    ms_per_image: float = float("nan"),
    size: tuple[int, int] | None = None,
) -> EvalResult:
    """The metrics of `dfr_core.evaluate.evaluate_outputs` for per-image maps of any size
    (masks at the original resolution; see the module docstring)."""
    scores = np.array([o.score for o in outs], dtype=np.float64)
    labels = np.asarray(labels)
    pool = pool_pixels(outs, masks, size, calibration.pixel_threshold if calibration else None)
    pixel_auroc = pro = None
    if pool.defect_scores.size and pool.normal_scores.size:
        both = np.concatenate([pool.defect_scores, pool.normal_scores])
        truth = np.concatenate(
            [np.ones(pool.defect_scores.size), np.zeros(pool.normal_scores.size)]
        )
        pixel_auroc = _safe(metrics.roc_auc, truth, both)
        pro = _safe(
            aupro_from_parts, pool.defect_scores, pool.defect_weights, pool.normal_scores.copy()
        )
    f1 = iou = None
    if pool.counts is not None and pool.defect_scores.size:
        tp, fp, fn = pool.counts
        f1, iou = _ratio(2 * tp, 2 * tp + fp + fn), _ratio(tp, tp + fp + fn)
    op = None
    if calibration is not None and len(scores):
        op = metrics.image_operating_point(labels, scores, calibration.image_threshold)
    return EvalResult(
        image_auroc=_safe(metrics.image_auroc, labels, scores),
        pixel_auroc=pixel_auroc,
        pro=pro,
        f1=f1,
        iou=iou,
        n_images=len(outs),
        n_anomalous=int(labels.sum()),
        ms_per_image=ms_per_image,
        tpr_at_1pct_fpr=_safe(metrics.tpr_at_fpr, labels, scores, 0.01),
        realised_image_fpr=None if op is None or op.fpr != op.fpr else float(op.fpr),
        realised_image_recall=None if op is None or op.recall != op.recall else float(op.recall),
    )
