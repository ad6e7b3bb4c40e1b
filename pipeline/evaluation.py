"""Evaluation sets and evaluating a model on one: used by ``dfr-pipeline evaluate`` and by the
promotion gate of the training job, so both measure a model the same way.

An evaluation set is an MVTec-layout labelled set (``test/<kind>/``, ``ground_truth/``), or a
listing (CSV/Parquet) with ``image_uri`` and ``label`` (``normal``/``defect``), optional
``mask_uri`` and optional ``product_line`` (rows of other lines are ignored); the training job
adds the line's confirmed defects from QA feedback. A defect without a mask counts for the
image metrics only: pixel AUROC, PRO and F1/IoU are computed on the images whose pixels are
known (normals and masked defects).

Metrics come from dfr_core.evaluate.evaluate_outputs (image/pixel AUROC, PRO, TPR at 1 % FPR,
realised FPR and recall at the calibrated threshold): one definition everywhere.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import secrets
import time
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from dfr_core import metrics
from dfr_core.artifact import LoadedModel, load_model, read_model_metadata
from dfr_core.calibrate import Calibration, compute_maps
from dfr_core.config import ModelConfig
from dfr_core.evaluate import EvalResult, evaluate_outputs, evaluation_curves
from dfr_core.evaluate_images import evaluate_image_outputs
from dfr_core.inference import forward_images
from dfr_core.model import AnomalyOutput, DFRModel
from pipeline import registry, storage
from pipeline.feedback import DEFECT, LABELS, NORMAL, FeedbackRow
from pipeline.manifest import Problem
from pipeline.mvtec_remote import (
    GOOD,
    LabelledSample,
    LabelledSet,
    LabelledSetError,
    list_labelled_set,
    load_samples,
)
from pipeline.storage import StorageOptions
from pipeline.tiled_sets import TiledSet, load_tiled_set

LISTING_SUFFIXES = (".csv", ".parquet")
EVALUATIONS = "_evaluations"


# --------------------------------------------------------------------------------------------
# Sets


def _listing_rows(data: bytes, uri: str) -> list[tuple[int, dict[str, str]]]:
    if uri.lower().endswith(".parquet"):
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [(i + 2, {k.lower(): "" if v is None else str(v).strip() for k, v in r.items()})
                for i, r in enumerate(rows)]  # fmt: skip
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    out = []
    for row in reader:
        cells = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if any(cells.values()):
            out.append((reader.line_num, cells))
    return out


def _uris(cells: dict[str, str], line: int, uri: str) -> tuple[str, str | None] | Problem:
    """(image URI, mask URI or None), relative ones resolved against the listing's folder by
    the one rule (storage.resolve_relative); a Problem for an entry that climbs out of it."""
    folder = storage.folder_of(uri)
    resolved = []
    for column in ("image_uri", "mask_uri"):
        value = cells.get(column)
        try:
            resolved.append(storage.resolve_relative(value, folder, column) if value else None)
        except ValueError as exc:
            return Problem(line, column, str(exc))
    return resolved[0] or "", resolved[1]


def list_labelled_listing(
    uri: str, product_line: str | None, options: StorageOptions | None = None
) -> list[LabelledSample]:
    """Samples of a labelled listing; LabelledSetError names every bad line and column."""
    rows = _listing_rows(storage.read_bytes(uri, options), uri)
    problems, samples = [], []
    for line, cells in rows:
        if product_line and cells.get("product_line") not in (None, "", product_line):
            continue
        label = cells.get("label", "").lower()
        if not cells.get("image_uri"):
            problems.append(Problem(line, "image_uri", "required value is missing"))
        if label not in LABELS:
            problems.append(
                Problem(line, "label", f"{cells.get('label', '')!r} is neither {NORMAL!r} "
                        f"nor {DEFECT!r}")
            )  # fmt: skip
        if problems and problems[-1].line == line:
            continue
        uris = _uris(cells, line, uri)
        if isinstance(uris, Problem):
            problems.append(uris)
            continue
        kind = GOOD if label == NORMAL else DEFECT
        samples.append(LabelledSample(uris[0], kind, uris[1]))
    if problems:
        text = "\n".join(f"  {p}" for p in problems)
        raise LabelledSetError(f"labelled listing {uri}: {len(problems)} problem(s):\n{text}")
    if not samples:
        raise LabelledSetError(f"labelled listing {uri}: no images for {product_line!r}")
    return samples


def list_eval_samples(
    uri: str, product_line: str | None, options: StorageOptions | None = None
) -> list[LabelledSample]:
    """A labelled listing (.csv/.parquet) or an MVTec-layout folder."""
    if uri.lower().endswith(LISTING_SUFFIXES):
        return list_labelled_listing(uri, product_line, options)
    return list_labelled_set(uri, options)


def feedback_samples(rows: tuple[FeedbackRow, ...]) -> list[LabelledSample]:
    """The confirmed defects of a line's feedback, as evaluation samples."""
    return [LabelledSample(r.image_uri, DEFECT, r.mask_uri) for r in rows if r.label == DEFECT]


def load_eval_set(
    samples: list[LabelledSample],
    geometry: ModelConfig | int | tuple[int, int],
    options: StorageOptions | None = None,
) -> LabelledSet | TiledSet:
    """The samples read for a model: resized to its input (masks too, nearest) for an untiled
    model or a bare size; for a tiled model, prepared images with masks at the ORIGINAL size."""
    if not samples:
        raise LabelledSetError("the evaluation set is empty")
    if isinstance(geometry, ModelConfig):
        if geometry.tile is not None:
            return load_tiled_set(samples, geometry, options)
        geometry = geometry.image_size
    return load_samples(samples, geometry, options)


# --------------------------------------------------------------------------------------------
# Metrics


def _pixel_known(lset: LabelledSet) -> np.ndarray:
    return np.array([s.defect == GOOD or s.mask_uri is not None for s in lset.samples], bool)


def metrics_of(out: AnomalyOutput, lset: LabelledSet, calibration: Calibration | None,
               ms_per_image: float = float("nan")) -> EvalResult:  # fmt: skip
    """evaluate_outputs, with pixel metrics restricted to images whose masks are known."""
    full = evaluate_outputs(out, lset.masks, lset.labels, calibration, ms_per_image)
    known = _pixel_known(lset)
    if known.all():
        return full
    if not known.any():
        return full._replace(pixel_auroc=None, pro=None, f1=None, iou=None)
    idx = torch.from_numpy(np.flatnonzero(known))
    sub = AnomalyOutput(out.anomaly_map[idx], out.score[idx])
    pix = evaluate_outputs(sub, lset.masks[known], lset.labels[known], calibration)
    return full._replace(pixel_auroc=pix.pixel_auroc, pro=pix.pro, f1=pix.f1, iou=pix.iou)


def _evaluate_tiled(
    model: DFRModel,
    calibration: Calibration | None,
    tset: TiledSet,
    device: torch.device | None,
    curves: bool,
) -> dict[str, Any]:
    """A tiled model on its stitched maps, pixels at the original resolution."""
    model.to(device or torch.device("cpu")).eval()
    t0 = time.perf_counter()
    outs = forward_images(model, tset.images)
    ms = 1000.0 * (time.perf_counter() - t0) / len(outs)
    result = evaluate_image_outputs(outs, tset.masks, tset.labels, calibration, ms)._asdict()
    result["skipped_images"] = len(tset.failures)
    result["pixels_at"] = "original resolution"
    if curves:  # the image ROC (the PRO curve of per-image maps is not stored)
        try:
            fpr, tpr, _ = metrics.roc_curve(tset.labels, np.array([o.score for o in outs]))
            idx = np.unique(np.linspace(0, len(fpr) - 1, min(200, len(fpr))).round().astype(int))
            result["curves"] = {"roc": {"fpr": fpr[idx].tolist(), "tpr": tpr[idx].tolist()}}
        except ValueError:
            result["curves"] = {}
    return result


def evaluate_model(
    model: DFRModel,
    calibration: Calibration | None,
    lset: LabelledSet | TiledSet,
    device: torch.device | None = None,
    curves: bool = True,
) -> dict[str, Any]:
    """The metrics dict stored in model.json / evaluation records (EvalResult fields + extras)."""
    if not len(lset.images):
        raise LabelledSetError("no readable images in the evaluation set")
    if isinstance(lset, TiledSet):
        return _evaluate_tiled(model, calibration, lset, device, curves)
    t0 = time.perf_counter()
    out = compute_maps(model, lset.images, device)
    ms = 1000.0 * (time.perf_counter() - t0) / len(lset.images)
    result = metrics_of(out, lset, calibration, ms)._asdict()
    result["skipped_images"] = len(lset.failures)
    if curves:  # on the images whose pixels are known (all of an MVTec set)
        idx = torch.from_numpy(np.flatnonzero(_pixel_known(lset)))
        sub = AnomalyOutput(out.anomaly_map[idx], out.score[idx])
        result["curves"] = evaluation_curves(sub, lset.masks[idx.numpy()], lset.labels[idx.numpy()])
    return result


# --------------------------------------------------------------------------------------------
# Stored versions


def line_has_model(models_uri: str, line: str, options: StorageOptions | None) -> str:
    """LATEST of ``line``; ValueError (naming the line) when the line has no model."""
    version = registry.latest_version(models_uri, line, options)
    if version is None:
        raise ValueError(f"product line {line!r} has no model in {models_uri}")
    return version


def load_version(
    models_uri: str,
    line: str,
    version: str,
    cache_dir: str,
    options: StorageOptions | None = None,
    extractor: Any | None = None,
) -> LoadedModel:
    """Fetch (verified) and load one published version, backbone included."""
    directory = registry.fetch(models_uri, line, version, cache_dir, options)
    meta = read_model_metadata(directory)
    weights = registry.resolve_weights(meta.weights_uri, cache_dir, options)
    return load_model(directory, weights, extractor)


def evaluation_uri(models_uri: str, line: str, version: str, name: str) -> str:
    registry.version_uri(models_uri, line, version)  # validates both names
    return storage.join_uri(models_uri, line, EVALUATIONS, version, name)


def write_evaluation(
    models_uri: str,
    line: str,
    version: str,
    data_uri: str,
    metrics: dict[str, Any],
    options: StorageOptions | None = None,
) -> str:
    """Store an evaluation record beside the version (versions themselves stay immutable)."""
    now = dt.datetime.now(dt.UTC)
    name = f"{now:%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}.json"
    record = {
        "product_line": line,
        "version": version,
        "data_uri": data_uri,
        "evaluated_at": now.isoformat(timespec="seconds"),
        "metrics": metrics,
    }
    uri = evaluation_uri(models_uri, line, version, name)
    storage.write_text_atomic(uri, json.dumps(record, indent=2, sort_keys=True, default=float),
                              options)  # fmt: skip
    return uri
