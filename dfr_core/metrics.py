"""Anomaly-detection metrics: image/pixel AUROC, PRO / AUPRO (MVTec AD), fixed-threshold scores.

numpy, and scipy for connected components (``scipy.ndimage.label``, a dependency). The curves and
AUROCs are computed here rather than with scikit-learn: they are exact under ties (below), need
only a partial sort for the PRO's low-FPR range, and do not depend on an optional library.
Every function takes numpy arrays or CPU/GPU torch tensors.

Threshold convention, shared by every function here and by ``dfr_core.calibrate``: a pixel or
image is predicted anomalous when its score is *strictly greater* than the threshold. Curve
points therefore carry thresholds that can be fed straight back into :func:`threshold_metrics`.

Ties are handled exactly everywhere: equal scores are grouped, so AUROC equals the
Mann-Whitney U statistic and every curve point is an achievable operating point.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

__all__ = [
    "ProCurve",
    "ImageOperatingPoint",
    "ThresholdMetrics",
    "aupro",
    "image_operating_point",
    "image_auroc",
    "label_components",
    "pixel_auroc",
    "pro_curve",
    "roc_auc",
    "roc_curve",
    "threshold_metrics",
    "tpr_at_fpr",
]


class ProCurve(NamedTuple):
    """PRO curve truncated at ``max_fpr``; ``fpr`` ascending, ``thresholds`` descending.

    The last point is interpolated at exactly ``max_fpr`` when no threshold lands there; it
    corresponds to no real threshold, so its threshold is NaN.
    """

    fpr: np.ndarray
    pro: np.ndarray
    thresholds: np.ndarray


class ThresholdMetrics(NamedTuple):
    """Pixel metrics pooled over all images; NaN where the ratio is 0/0 (undefined)."""

    f1: float
    iou: float
    precision: float
    recall: float
    fpr: float


class ImageOperatingPoint(NamedTuple):
    """What an image threshold gives on a labelled set: ``score > threshold`` is flagged.

    ``fpr`` is the share of normal images flagged, ``recall`` the share of defective ones;
    NaN where the set has no image of that class.
    """

    threshold: float
    fpr: float
    recall: float
    n_flagged_normal: int
    n_normal: int
    n_flagged_defective: int
    n_defective: int


# --------------------------------------------------------------------------- input handling


def _to_numpy(x: Any) -> np.ndarray:
    """Accept torch tensors (any device, with grad) without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _binary(x: Any, name: str) -> np.ndarray:
    """Bool view of 0/1 labels; anything else (e.g. 0/255 masks) is rejected, not guessed at."""
    a = _to_numpy(x)
    if a.dtype == np.bool_:
        return a
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ValueError(f"{name} must be binary (0/1 or bool), got dtype {a.dtype}")
    if not ((a == 0) | (a == 1)).all():
        raise ValueError(f"{name} must be binary (0/1 or bool); found other values")
    return a.astype(bool)


def _scores(x: Any, name: str) -> np.ndarray:
    """Float scores without NaN; float32 is kept so 20M-pixel stacks are not doubled in memory."""
    a = _to_numpy(x)
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        a = a.astype(np.float64)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    elif not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must be real-valued, got dtype {a.dtype}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN; a NaN score has no rank")
    return a


def _same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    """Shape errors name both shapes: the usual cause is a transposed or unbatched array."""
    if a.shape != b.shape:
        raise ValueError(f"{a_name} shape {a.shape} does not match {b_name} shape {b.shape}")
    if a.size == 0:
        raise ValueError(f"{a_name} shape {a.shape} and {b_name} shape {b.shape} are empty")


def _pixel_pair(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(N, H, W)`` bool masks and float maps; a single ``(H, W)`` image is allowed."""
    m, s = _to_numpy(masks), _to_numpy(maps)
    _same_shape(m, s, "masks", "maps")
    if m.ndim == 2:
        m, s = m[None], s[None]
    if m.ndim != 3:
        raise ValueError(f"masks/maps must be (N, H, W) or (H, W), got shape {m.shape}")
    return _binary(m, "masks"), _scores(s, "maps")


def _split(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative scores as fresh 1-D copies (safe to sort in place)."""
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        raise ValueError(
            f"AUROC needs both classes; got {pos.size} positives and {neg.size} negatives"
        )
    return pos, neg


def _count_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of entries strictly above each threshold (``sorted_scores`` ascending)."""
    return sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="right")


# --------------------------------------------------------------------------- ROC


def _auc_from_split(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney U / (n_pos * n_neg) with ties counted 1/2; sorts ``pos`` and ``neg`` in place.

    Two sorts plus a searchsorted of sorted keys beats an argsort of the pooled scores by ~5x on
    20M pixels, and integer counts keep the statistic exact.
    """
    pos.sort()
    neg.sort()
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * pos.size * neg.size))


def roc_auc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve for binary ``labels`` (any shape, flattened with ``scores``).

    Equals the probability that a random positive outscores a random negative (ties count 1/2).
    Raises ValueError when only one class is present, since the area is then undefined.
    """
    y, s = _to_numpy(labels), _to_numpy(scores)
    _same_shape(y, s, "labels", "scores")
    return _auc_from_split(*_split(_binary(y, "labels"), _scores(s, "scores")))


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` at every distinct score, from (0, 0) to (1, 1).

    Point i is the operating point ``score > thresholds[i]``: ``thresholds`` are the distinct
    scores descending (the first, the maximum, predicts nothing) followed by ``-inf`` (predicts
    everything). The trapezoid area under the points equals :func:`roc_auc`.
    """
    y, s = _to_numpy(labels), _to_numpy(scores)
    _same_shape(y, s, "labels", "scores")
    y, s = _binary(y, "labels"), _scores(s, "scores")
    pos, neg = _split(y, s)
    pos.sort()
    neg.sort()
    thresholds = np.unique(s)[::-1]
    tp = np.append(_count_above(pos, thresholds), pos.size)
    fp = np.append(_count_above(neg, thresholds), neg.size)
    thresholds = np.append(thresholds.astype(np.float64), -np.inf)
    return fp / neg.size, tp / pos.size, thresholds


def image_auroc(labels: Any, image_scores: Any) -> float:
    """Image-level AUROC: one 0/1 label (1 = defective) and one score per image."""
    y, s = _to_numpy(labels), _to_numpy(image_scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    return roc_auc(y, s)


def tpr_at_fpr(labels: Any, image_scores: Any, max_fpr: float = 0.01) -> float:
    """Largest true-positive rate of any threshold whose false-positive rate is <= ``max_fpr``.

    The QA lead's number: the share of defective images caught while at most ``max_fpr`` of
    the good ones are flagged, chosen with hindsight on this set (an upper bound on what a
    calibrated threshold gives; :func:`image_operating_point` gives the latter). Raises
    ValueError when only one class is present.
    """
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    y, s = _to_numpy(labels), _to_numpy(image_scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= max_fpr + 1e-12].max())


def image_operating_point(labels: Any, image_scores: Any, threshold: float) -> ImageOperatingPoint:
    """Realised image FPR and recall of ``score > threshold`` (e.g. the calibrated threshold)."""
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    y, s = _to_numpy(labels), _to_numpy(image_scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"expected 1-D labels and scores, got shapes {y.shape} and {s.shape}")
    _same_shape(y, s, "labels", "scores")
    y, s = _binary(y, "labels"), _scores(s, "scores")
    flagged = s > _exact_threshold(threshold, s.dtype)
    n_def = int(np.count_nonzero(y))
    n_norm = int(y.size - n_def)
    fl_def = int(np.count_nonzero(flagged & y))
    fl_norm = int(np.count_nonzero(flagged & ~y))
    return ImageOperatingPoint(
        threshold=float(threshold),
        fpr=_ratio(fl_norm, n_norm),
        recall=_ratio(fl_def, n_def),
        n_flagged_normal=fl_norm,
        n_normal=n_norm,
        n_flagged_defective=fl_def,
        n_defective=n_def,
    )


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Pixel-level AUROC with all pixels of all images pooled, as in the MVTec AD benchmark."""
    m, s = _pixel_pair(masks, maps)
    return _auc_from_split(*_split(m, s))


# --------------------------------------------------------------------------- connected components

#: 8-connectivity within an image, nothing across the images of a (N, H, W) stack.
_STACK_8 = np.zeros((3, 3, 3), dtype=bool)
_STACK_8[1] = True


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Connected components of a 2-D mask: ``(labels int32, count)``, 0 = background
    (``scipy.ndimage.label``; nonzero = foreground)."""
    m = _to_numpy(mask)
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
    fpr = np.append(_count_above(top, thresholds) / n_neg, last[0])
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
    fpr = np.append(_count_above(neg, thresholds) / neg.size, 1.0)
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
    m, s = _pixel_pair(masks, maps)
    weights = _region_weights(m)
    defect_scores, neg = s[m], s[~m]
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


# --------------------------------------------------------------------------- fixed threshold


def _exact_threshold(threshold: float, dtype: np.dtype) -> np.generic:
    """Largest value of ``dtype`` <= threshold: ``s > it`` equals ``s > threshold`` exactly.

    Comparing float32 maps with a Python float would round the threshold to float32 (NEP 50)
    and could flip pixels tied with it; rounding down instead is exact and avoids upcasting.
    """
    with np.errstate(over="ignore"):  # beyond the dtype's range rounds to +-inf, still exact
        t = dtype.type(threshold)
    if float(t) > threshold:
        t = np.nextafter(t, dtype.type(-np.inf))
    return t


def _ratio(num: int, den: int) -> float:
    """num / den, NaN for 0/0: an undefined score should not masquerade as 0 or 1."""
    return num / den if den else math.nan


def threshold_metrics(masks: Any, maps: Any, threshold: float) -> ThresholdMetrics:
    """F1, IoU, precision, recall and FPR of ``map > threshold``, pixels pooled over images."""
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    m, s = _pixel_pair(masks, maps)
    pred = s > _exact_threshold(threshold, s.dtype)
    tp = int(np.count_nonzero(pred & m))
    n_pred, n_pos = int(np.count_nonzero(pred)), int(np.count_nonzero(m))
    fp, fn = n_pred - tp, n_pos - tp
    return ThresholdMetrics(
        f1=_ratio(2 * tp, 2 * tp + fp + fn),
        iou=_ratio(tp, tp + fp + fn),
        precision=_ratio(tp, n_pred),
        recall=_ratio(tp, n_pos),
        fpr=_ratio(fp, m.size - n_pos),
    )
