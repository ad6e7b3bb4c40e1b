"""Evaluate a model on a labelled test set with the metrics of the paper and MVTec AD."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch

from dfr_core import metrics
from dfr_core.calibrate import Calibration, compute_maps
from dfr_core.model import AnomalyOutput, DFRModel


class EvalResult(NamedTuple):
    image_auroc: float | None  # None when the test set has a single class
    pixel_auroc: float | None  # None when no defect pixel exists
    pro: float | None
    f1: float | None  # pixel F1 / IoU at the calibrated pixel threshold
    iou: float | None
    n_images: int
    n_anomalous: int
    ms_per_image: float
    tpr_at_1pct_fpr: float | None = None  # best image TPR with image FPR <= 1% (hindsight)
    realised_image_fpr: float | None = None  # at the calibrated image threshold
    realised_image_recall: float | None = None


def _safe(fn, *args) -> float | None:
    try:
        return float(fn(*args))
    except ValueError:
        return None


def _nan_to_none(x: float) -> float | None:
    return None if x != x else float(x)


def evaluate_outputs(
    out: AnomalyOutput,
    masks: np.ndarray,
    labels: np.ndarray,
    calibration: Calibration | None = None,
    ms_per_image: float = float("nan"),
) -> EvalResult:
    """Metrics of maps/scores already computed (so subsets need no second forward pass)."""
    maps = out.anomaly_map.numpy()
    masks = np.asarray(masks).astype(bool)
    scores = out.score.numpy()
    f1 = iou = None
    if calibration is not None and masks.any():
        tm = metrics.threshold_metrics(masks, maps, calibration.pixel_threshold)
        f1, iou = tm.f1, tm.iou
    op = None
    if calibration is not None and len(scores):
        op = metrics.image_operating_point(labels, scores, calibration.image_threshold)
    return EvalResult(
        image_auroc=_safe(metrics.image_auroc, labels, scores),
        pixel_auroc=_safe(metrics.pixel_auroc, masks, maps),
        pro=_safe(metrics.aupro, masks, maps),
        f1=f1,
        iou=iou,
        n_images=len(maps),
        n_anomalous=int(np.asarray(labels).sum()),
        ms_per_image=ms_per_image,
        tpr_at_1pct_fpr=_safe(metrics.tpr_at_fpr, labels, scores, 0.01),
        realised_image_fpr=_nan_to_none(op.fpr) if op else None,
        realised_image_recall=_nan_to_none(op.recall) if op else None,
    )


def evaluate(
    model: DFRModel,
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    calibration: Calibration | None = None,
    device: torch.device | None = None,
) -> EvalResult:
    """images (N, S, S, 3) uint8, masks (N, S, S) in {0,1}, labels (N,) 1 = defective."""
    t0 = time.perf_counter()
    out = compute_maps(model, images, device)
    ms = 1000.0 * (time.perf_counter() - t0) / max(len(images), 1)
    return evaluate_outputs(out, masks, labels, calibration, ms)


def _thin(x: np.ndarray, y: np.ndarray, max_points: int) -> dict[str, list[float]]:
    """At most max_points evenly spaced points of a curve, both ends kept (for model.json)."""
    idx = np.unique(np.linspace(0, len(x) - 1, min(max_points, len(x))).round().astype(int))
    return {"x": [float(v) for v in x[idx]], "y": [float(v) for v in y[idx]]}


def evaluation_curves(
    out: AnomalyOutput, masks: np.ndarray, labels: np.ndarray, max_points: int = 200
) -> dict[str, dict[str, list[float]]]:
    """Image ROC and PRO curves, thinned for storage beside the model and for the QA report.

    A curve that is undefined for this test set (one class only, no defect region) is omitted.
    """
    curves: dict[str, dict[str, list[float]]] = {}
    try:
        fpr, tpr, _ = metrics.roc_curve(labels, out.score.numpy())
        roc = _thin(fpr, tpr, max_points)
        curves["roc"] = {"fpr": roc["x"], "tpr": roc["y"]}
    except ValueError:
        pass
    try:
        pro = metrics.pro_curve(np.asarray(masks).astype(bool), out.anomaly_map.numpy())
        thin = _thin(pro.fpr, pro.pro, max_points)
        curves["pro"] = {"fpr": thin["x"], "pro": thin["y"]}
    except ValueError:
        pass
    return curves
