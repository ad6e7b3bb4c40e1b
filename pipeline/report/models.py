"""The report's model-version sections: what each version named by the rows was trained on,
how it was calibrated and how it evaluated, from its model.json in the registry.

model.json is read here as a document to display (every field optional; a missing or odd one
becomes a dash, a missing file a note), not as an artifact to load: dfr_core.artifact validates
artifacts, this only shows them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.report.formatting import MISSING, is_number, num
from pipeline.report.inputs import short_error
from pipeline.report.plots import curve_plot, loss_plot
from pipeline.storage import StorageOptions

MODEL_FILE = "model.json"
#: (label, text) rows of a two-column table
Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class ModelInfo:
    """One model version's model.json (or why it could not be read)."""

    product_line: str
    version: str
    meta: dict[str, Any] | None
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
        uri = storage.join_uri(models_uri, product_line, version, MODEL_FILE)
        meta = json.loads(storage.read_text(uri, options))
        if not isinstance(meta, dict):
            raise ValueError("model.json is not a JSON object")
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


def geometry_text(model_config: dict[str, Any]) -> str:
    """How the model sees an image, from model.json's model_config: ``256`` (square resize),
    ``256x640`` (HxW resize) or ``256 px tiles, overlap 32, scale 1, at most 64 tiles``."""
    size = model_config.get("image_size")
    if isinstance(size, list):
        size = "x".join(num(v) for v in size)
    tile = model_config.get("tile")
    if tile is None:
        return num(size)
    return (
        f"{num(tile)} px tiles, overlap {num(model_config.get('tile_overlap', 0))}, "
        f"scale {num(model_config.get('tile_scale', 1.0))}, "
        f"at most {num(model_config.get('max_tiles'))} tiles"
    )


def _section(obj: object) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else {}


def _training_pairs(meta: dict[str, Any]) -> Pairs:
    backbone = _section(meta.get("backbone"))
    model_config = _section(meta.get("model_config"))
    training = _section(meta.get("training"))
    extra = _section(meta.get("extra"))
    layers = backbone.get("layers")
    layer_text = ", ".join(map(str, layers)) if isinstance(layers, list) else None
    return [
        ("backbone", str(backbone.get("name") or MISSING)),
        ("layers", layer_text or MISSING),
        ("input geometry", geometry_text(model_config)),
        ("latent dim", num(meta.get("latent_dim"))),
        ("train images", num(training.get("train_images"))),
        ("validation images", num(training.get("val_images"))),
        ("epochs run", num(training.get("epochs_run"))),
        ("best epoch", num(training.get("best_epoch"))),
        ("best loss", num(training.get("best_loss"))),
        ("created at", str(extra.get("created_at") or MISSING)),
    ]


#: (label, model.json key) of the calibration and evaluation tables, in display order.
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


def _number_pairs(section: dict[str, Any], rows: tuple[tuple[str, str], ...]) -> Pairs:
    return [(label, num(section.get(key))) for label, key in rows]


def _calibration_pairs(calibration: dict[str, Any]) -> Pairs:
    method = str(calibration.get("method") or MISSING)
    return [*_number_pairs(calibration, CALIBRATION_ROWS), ("method", method)]


def _curve_plots(metrics: dict[str, Any]) -> list[str]:
    """ROC and PRO plots from ``metrics.curves`` when the training job stored them."""
    curves = _section(metrics.get("curves"))
    plots = []
    roc = _curve(curves.get("roc"), "fpr", "tpr")
    if roc:
        title = f"image ROC (AUROC {num(metrics.get('image_auroc'), 3)})"
        plots.append(curve_plot(*roc, ("false positive rate", "true positive rate"), title, True))
    pixel_roc = _curve(curves.get("pixel_roc"), "fpr", "tpr")
    if pixel_roc:
        title = f"pixel ROC (AUROC {num(metrics.get('pixel_auroc'), 3)})"
        labels = ("pixel false positive rate", "pixel true positive rate")
        plots.append(curve_plot(*pixel_roc, labels, title, True))
    pro = _curve(curves.get("pro"), "fpr", "pro")
    if pro:
        title = f"PRO curve (AUPRO {num(metrics.get('pro'), 3)})"
        plots.append(curve_plot(*pro, ("pixel false positive rate", "PRO"), title, False))
    return plots


def model_view(info: ModelInfo) -> ModelView:
    """Training summary, calibration and evaluation (with curves) of one model version."""
    if info.meta is None:
        return ModelView(info.product_line, info.version, info.problem)
    meta = info.meta
    metrics = _section(meta.get("metrics"))
    training = _section(meta.get("training"))
    calibration = _section(meta.get("calibration"))
    has_eval = any(is_number(metrics.get(k)) for k in ("image_auroc", "pixel_auroc", "pro"))
    history = training.get("history")
    loss = loss_plot(history if isinstance(history, list) else [], training.get("best_epoch"))
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
