"""PRO / AUPRO (MVTec AD): per-region overlap against pooled pixel FPR, exact under ties.

Regions come from ``scipy.ndimage.label`` (8-connected within an image). The curve is computed
here rather than with a library because it needs only a partial sort for the low-FPR range and
stays exact at every distinct score; the conventions (``score > threshold``, ties grouped) are
those of :mod:`dfr_core.metrics`, which re-exports everything public here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from dfr_core.metric_inputs import count_above, pixel_pair, to_numpy


class ProCurve(NamedTuple):
    """PRO curve truncated at ``max_fpr``; ``fpr`` ascending, ``thresholds`` descending.

    The last point is interpolated at exactly ``max_fpr`` when no threshold lands there; it
    corresponds to no real threshold, so its threshold is NaN.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray


# --------------------------------------------------------------------------- connected components

#: 8-connectivity within an image, nothing across the images of a (N, H, W) stack.
_STACK_8 = np.zeros((3, 3, 3), dtype=bool)
_STACK_8[1] = True


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D mask: ``(labels int32, count)``, 0 = background
    (``scipy.ndimage.label``; nonzero = foreground)."""
    m = to_numpy(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.ones((3, 3), dtype=bool) if connectivity == 8 else None
    labels, count = ndimage.label(m != 0, structure=structure)
    return labels.astype(np.int32, copy=False), int(count)


# --------------------------------------------------------------------------- PRO


def _region_weights(masks: np.ndarray) -> np.ndarray:
    """Weight 1 / (|region| * n_regions) of every defect pixel, in ``masks[masks]`` order.

    With these weights the PRO at a threshold is just the summed weight of defect pixels above
    it. Regions are 8-connected within an image and never span two images.
    """
    labels, count = ndimage.label(masks, structure=_STACK_8)
    if count == 0:
        raise ValueError("PRO needs at least one defect region, but every mask is empty")
    component = labels[masks]
    sizes = np.bincount(component, minlength=count + 1)
    return 1.0 / (sizes[component] * count)


def _weight_above(
    sorted_scores: np.ndarray, tail: np.ndarray, thresholds: Any, side: str = "right"
) -> np.ndarray:
    """Total weight strictly above (``side="right"``) or at-or-above each threshold."""
    return tail[np.searchsorted(sorted_scores, thresholds, side=side)]


def _distinct_points(
    neg: np.ndarray, defects: np.ndarray, tail: np.ndarray, max_fpr: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curve at every distinct score, down to the first point past ``max_fpr``.

    Only the top ``floor(max_fpr * n_neg) + 1`` normal scores can reach the kept part of the
    curve, so a linear-time partition replaces a full sort of all pixels. ``neg`` is reordered
    in place.
    """
    n_neg = neg.size
    keep = math.floor(max_fpr * n_neg) + 1
    if keep > n_neg:  # max_fpr == 1: every threshold matters, down to "predict everything"
        top = np.sort(neg)
        candidates = np.concatenate([top, defects])
        last = (1.0, tail[0], -np.inf)
    else:
        neg.partition(n_neg - keep)
        top = np.sort(neg[n_neg - keep :])
        cutoff = top[0]
        candidates = np.concatenate([top, defects[np.searchsorted(defects, cutoff) :]])
        # "score > nextafter(cutoff)" is "score >= cutoff": at least `keep` normal pixels, so
        # fpr > max_fpr and this point only serves the interpolation at max_fpr.
        last = (
            np.count_nonzero(neg >= cutoff) / n_neg,
            _weight_above(defects, tail, cutoff, side="left"),
            float(np.nextafter(cutoff, -np.inf)),
        )
    thresholds = np.unique(candidates)[::-1]
    fpr = np.append(count_above(top, thresholds) / n_neg, last[0])
    pro = np.append(_weight_above(defects, tail, thresholds), last[1])
    return fpr, pro, np.append(thresholds.astype(np.float64), last[2])


def _grid_points(
    neg: np.ndarray, defects: np.ndarray, tail: np.ndarray, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Curve at evenly spaced thresholds from max to min score (the legacy MVTec sampling).

    Thresholds are cast to the score dtype first so each one is exactly the value compared.
    """
    neg.sort()
    hi, lo = max(neg[-1], defects[-1]), min(neg[0], defects[0])
    thresholds = np.linspace(float(hi), float(lo), num_thresholds).astype(neg.dtype)
    fpr = np.append(count_above(neg, thresholds) / neg.size, 1.0)
    pro = np.append(_weight_above(defects, tail, thresholds), tail[0])
    return fpr, pro, np.append(thresholds.astype(np.float64), -np.inf)


def _truncate(fpr: np.ndarray, pro: np.ndarray, thr: np.ndarray, max_fpr: float) -> ProCurve:
    """Keep points with fpr <= max_fpr and interpolate one point at exactly max_fpr.

    The input always ends beyond (or at) ``max_fpr``, so the interpolation has a right neighbour.
    """
    n = int(np.searchsorted(fpr, max_fpr, side="right"))
    if fpr[n - 1] == max_fpr:
        return ProCurve(fpr[:n], pro[:n], thr[:n])
    frac = (max_fpr - fpr[n - 1]) / (fpr[n] - fpr[n - 1])
    pro_at_max = pro[n - 1] + frac * (pro[n] - pro[n - 1])
    return ProCurve(
        np.append(fpr[:n], max_fpr), np.append(pro[:n], pro_at_max), np.append(thr[:n], np.nan)
    )


def pro_curve(
    masks: Any, maps: Any, max_fpr: float = 0.3, num_thresholds: int | None = None
) -> ProCurve:
    """Per-Region Overlap vs pooled pixel FPR (MVTec AD), for fpr in ``[0, max_fpr]``.

    PRO(t) is the mean over 8-connected ground-truth regions (per image) of the fraction of the
    region with ``map > t``; FPR(t) is the fraction of all normal pixels with ``map > t``. By
    default the curve is exact at every distinct score (24 bytes per kept point: ~6M points
    for 300 random float32 256x256 maps at max_fpr=0.3); ``num_thresholds`` instead samples that
    many evenly spaced thresholds (coarser, small output). Starts at (0, 0).
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2 or None, got {num_thresholds}")
    m, s = pixel_pair(masks, maps)
    return pro_curve_from_parts(s[m], _region_weights(m), s[~m], max_fpr, num_thresholds)


def pro_curve_from_parts(
    defect_scores: np.ndarray,
    weights: np.ndarray,
    neg: np.ndarray,
    max_fpr: float = 0.3,
    num_thresholds: int | None = None,
) -> ProCurve:
    """`pro_curve` from its parts: defect pixels' scores and region weights (1 / (|region| *
    n_regions), see `_region_weights`) and the normal pixels' scores (reordered in place).

    For maps of different sizes (tiled models), where no (N, H, W) stack exists; the caller
    labels each image's regions itself (`label_components`).
    """
    if defect_scores.size == 0:
        raise ValueError("PRO needs at least one defect region, but every mask is empty")
    if neg.size == 0:
        raise ValueError("PRO needs normal pixels to measure FPR, but every mask pixel is 1")
    order = np.argsort(defect_scores)
    defects = defect_scores[order]
    # tail[i] = weight of defects[i:], so tail[searchsorted(defects, t, "right")] = PRO(t).
    tail = np.append(np.cumsum(weights[order][::-1])[::-1], 0.0)
    if num_thresholds is None:
        points = _distinct_points(neg, defects, tail, max_fpr)
    else:
        points = _grid_points(neg, defects, tail, num_thresholds)
    return _truncate(*points, max_fpr)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid rule (np.trapz was renamed across numpy versions; this is four lines)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def aupro(masks: Any, maps: Any, max_fpr: float = 0.3) -> float:
    """Area under the PRO curve for fpr in [0, max_fpr], divided by max_fpr (MVTec AD).

    1.0 is a perfect segmentation; a map ranking every normal pixel above every defect pixel
    scores 0.0. Clipped to [0, 1] only to hide float rounding of the summed region weights.
    """
    curve = pro_curve(masks, maps, max_fpr)
    return min(max(_trapezoid(curve.pro, curve.fpr) / max_fpr, 0.0), 1.0)


def aupro_from_parts(
    defect_scores: np.ndarray, weights: np.ndarray, neg: np.ndarray, max_fpr: float = 0.3
) -> float:
    """`aupro` from its parts (see `pro_curve_from_parts`): maps of different sizes."""
    curve = pro_curve_from_parts(defect_scores, weights, neg, max_fpr)
    return min(max(_trapezoid(curve.pro, curve.fpr) / max_fpr, 0.0), 1.0)
