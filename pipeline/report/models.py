"""The report's model-version sections: what each version named by the rows was trained on,
how it was calibrated and how it evaluated, from its model.json in the registry.

model.json is parsed by dfr_core.artifact_meta (the one reader of its keys) and shown here:
the optional sections' missing or odd values become a dash; a missing file, or one the parser
refuses, a note. The weights are never loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from dfr_core.artifact_meta import (
    CONFIG_FILE,
    CalibrationRecord,
    EvaluationRecord,
    ModelMetadata,
    parse_metadata,
)
from dfr_core.config import ModelConfig
from pipeline import storage
from pipeline.report.formatting import MISSING, is_number, num
from pipeline.report.inputs import short_error
from pipeline.report.plots import curve_plot, loss_plot
from pipeline.storage import StorageOptions

#: (label, text) rows of a two-column table
Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class ModelInfo:
    """One model version's model.json (or why it could not be read)."""

    product_line: str
    version: str
    meta: ModelMetadata | None
    problem: str = ""


@dataclass(frozen=True)
class ModelView:
    """What the page shows of one model version (``problem`` set when there is nothing else)."""

    product_line: str
    version: str
    problem: str = ""
    training: Pairs | None = None
    calibration: Pairs | None = None  # None: not calibrated
    metrics: Pairs | None = None  # None: no labelled test set
    curves_note: bool = False  # evaluated, but no curves stored
    plots: tuple[tuple[str, str], ...] = ()  # (src, alt)


def read_model_info(
    models_uri: str, product_line: str, version: str, options: StorageOptions | None
) -> ModelInfo:
    """Read ``{models_uri}/{line}/{version}/model.json``; failures become a visible note."""
    try:
        uri = storage.join_uri(models_uri, product_line, version, CONFIG_FILE)
        meta = parse_metadata(json.loads(storage.read_text(uri, options)), uri)
    except (OSError, ValueError) as exc:
        return ModelInfo(product_line, version, None, f"model.json unavailable: {short_error(exc)}")
    return ModelInfo(product_line, version, meta)


def _curve(spec: object, x_key: str, y_key: str) -> tuple[list[float], list[float]] | None:
    """A stored curve ``{x_key: [...], y_key: [...]}`` if it is well formed, else None."""
    if not isinstance(spec, dict):
        return None
    x, y = spec.get(x_key), spec.get(y_key)
    if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or len(x) < 2:
        return None
    if not all(is_number(v) and math.isfinite(float(v)) for v in [*x, *y]):
        return None
    return [float(v) for v in x], [float(v) for v in y]


def geometry_text(config: ModelConfig) -> str:
    """How the model sees an image: ``256`` (square resize), ``256x640`` (HxW resize) or
    ``256 px tiles, overlap 32, scale 1, at most 64 tiles``."""
    if config.tile is None:
        size = config.image_size
        return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"
    return (
        f"{config.tile} px tiles, overlap {config.tile_overlap}, scale {num(config.tile_scale)}, "
        f"at most {config.max_tiles} tiles"
    )


def _training_pairs(meta: ModelMetadata) -> Pairs:
    training = meta.training
    return [
        ("backbone", meta.backbone.name or MISSING),
        ("layers", ", ".join(meta.backbone.layers) or MISSING),
        ("input geometry", geometry_text(meta.model_config)),
        ("latent dim", num(meta.latent_dim)),
        ("train images", num(training.train_images)),
        ("validation images", num(training.val_images)),
        ("epochs run", num(training.epochs_run)),
        ("best epoch", num(training.best_epoch)),
        ("best loss", num(training.best_loss)),
        ("created at", meta.created_at or MISSING),
    ]


#: (label, attribute of the typed record) of the calibration and evaluation tables, in
#: display order.
CALIBRATION_ROWS = (
    ("image threshold", "image_threshold"),
    ("pixel threshold", "pixel_threshold"),
    ("image FPR target", "image_fpr"),
    ("pixel FPR target", "pixel_fpr"),
    ("calibration images", "n_images"),
)
METRIC_ROWS = (
    ("image AUROC", "image_auroc"),
    ("pixel AUROC", "pixel_auroc"),
    ("PRO (AUPRO)", "pro"),
    ("pixel F1", "f1"),
    ("pixel IoU", "iou"),
    ("test images", "n_images"),
    ("anomalous test images", "n_anomalous"),
)


def _number_pairs(
    record: CalibrationRecord | EvaluationRecord, rows: tuple[tuple[str, str], ...]
) -> Pairs:
    return [(label, num(getattr(record, name))) for label, name in rows]


def _calibration_pairs(calibration: CalibrationRecord) -> Pairs:
    method = calibration.method or MISSING
    return [*_number_pairs(calibration, CALIBRATION_ROWS), ("method", method)]


def _curve_plots(metrics: EvaluationRecord) -> list[str]:
    """ROC and PRO plots from ``metrics.curves`` when the training job stored them."""
    curves = metrics.curves
    plots = []
    roc = _curve(curves.get("roc"), "fpr", "tpr")
    if roc:
        title = f"image ROC (AUROC {num(metrics.image_auroc, 3)})"
        plots.append(curve_plot(*roc, ("false positive rate", "true positive rate"), title, True))
    pixel_roc = _curve(curves.get("pixel_roc"), "fpr", "tpr")
    if pixel_roc:
        title = f"pixel ROC (AUROC {num(metrics.pixel_auroc, 3)})"
        labels = ("pixel false positive rate", "pixel true positive rate")
        plots.append(curve_plot(*pixel_roc, labels, title, True))
    pro = _curve(curves.get("pro"), "fpr", "pro")
    if pro:
        title = f"PRO curve (AUPRO {num(metrics.pro, 3)})"
        plots.append(curve_plot(*pro, ("pixel false positive rate", "PRO"), title, False))
    return plots


def model_view(info: ModelInfo) -> ModelView:
    """Training summary, calibration and evaluation (with curves) of one model version."""
    if info.meta is None:
        return ModelView(info.product_line, info.version, info.problem)
    meta = info.meta
    metrics, calibration = meta.metrics, meta.calibration
    has_eval = metrics.evaluated
    loss = loss_plot(list(meta.training.history), meta.training.best_epoch)
    name = f"{info.product_line} / {info.version}"
    plots = ([(loss, f"{name} training loss")] if loss else []) + [
        (src, f"{name} curve") for src in _curve_plots(metrics)
    ]
    return ModelView(
        info.product_line,
        info.version,
        training=_training_pairs(meta),
        calibration=_calibration_pairs(calibration) if calibration else None,
        metrics=_number_pairs(metrics, METRIC_ROWS) if has_eval else None,
        curves_note=has_eval and len(plots) <= (1 if loss else 0),
        plots=tuple(plots),
    )
