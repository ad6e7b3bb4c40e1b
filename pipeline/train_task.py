"""One product line's training, as one Ray task: read, fit, calibrate, evaluate, publish.

Each task reads its images through the storage layer, fits, calibrates, optionally evaluates,
saves an artifact and publishes it; :func:`train_line` returns a typed :class:`LineResult` and never
raises, so one failing line is reported with its error and the others go on. The driver that
submits these tasks is :mod:`pipeline.train_job`.

Failures: transient storage errors (connection resets, timeouts, throttling surfacing as
OSError) are retried inside the task up to `retries` times; data errors are not, since they
would fail again.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

from dfr_core.artifact import ArtifactError, save_model
from dfr_core.backbones import FeatureBackbone, WeightsNotFoundError, build_backbone
from dfr_core.calibrate import Calibration, calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig, to_dict
from dfr_core.decode import DecodeError
from dfr_core.device import pick_device
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRModel
from dfr_core.train import fit, holdout_splits
from pipeline import drift_io, evaluation, promotion, registry, storage
from pipeline.feedback import DEFECT, NORMAL, FeedbackRow
from pipeline.image_sets import LoadedImages, load_images, resolve_images
from pipeline.manifest import ManifestRow
from pipeline.mvtec_remote import LabelledSample, LabelledSetError
from pipeline.progress import TaskReporter
from pipeline.storage import StorageOptions
from pipeline.tiled_sets import join, load_prepared, take

logger = logging.getLogger(__name__)

_MAX_RETRY_DELAY_S = 30.0


class LineStatus(StrEnum):
    OK = "ok"
    ERROR = "error"


OK = LineStatus.OK
ERROR = LineStatus.ERROR


@dataclass(frozen=True)
class LineResult:
    """One product line's training outcome, as the driver collects and the CLI prints it.

    A failed line has ``error`` set and none of the trained fields (its version is never
    published); ``attempts`` and ``wall_seconds`` are None when its worker was lost.
    """

    product_line: str
    line: int  # the manifest line, for the operator
    status: LineStatus
    error: str | None = None
    attempts: int | None = None
    wall_seconds: float | None = None
    version: str | None = None
    device: str | None = None
    node_id: str | None = None
    train_images: int | None = None
    held_out_images: int | None = None
    skipped_images: int | None = None
    latent_dim: int | None = None
    epochs_run: int | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # evaluation (empty: no test set)
    promoted: bool | None = None
    promotion: str | None = None  # why it was (not) promoted


@dataclass(frozen=True)
class LineTask:
    """What one Ray task needs: plain, picklable values only (no filesystem objects)."""

    row: ManifestRow
    model: ModelConfig
    train: TrainConfig
    calibration: CalibrationConfig
    models_uri: str
    weights_uri: str | None
    storage: StorageOptions
    min_train_images: int
    max_bad_fraction: float
    retries: int
    retry_delay_s: float
    cache_dir: str
    threads: int
    feedback: tuple[FeedbackRow, ...] = ()  # this line's QA verdicts
    feedback_uri: str | None = None
    feedback_sha256: str | None = None
    promotion_tolerance: float = promotion.DEFAULT_TOLERANCE


class LineDataError(ValueError):
    """The data of one product line cannot be trained on (not retried)."""


# --------------------------------------------------------------------------------------------
# inside the task


# One backbone per worker process, keyed by what determines its weights: a worker that trains
# several product lines (or retries one) builds it once.
_BACKBONES: dict[tuple[str, tuple[str, ...], str | None], FeatureBackbone] = {}


def get_extractor(config: ModelConfig, weights_path: str | None) -> FeatureExtractor:
    """A FeatureExtractor on this worker's cached backbone (built on first use)."""
    key = (config.backbone, tuple(config.layers), weights_path)
    backbone = _BACKBONES.get(key)
    if backbone is None:
        backbone = build_backbone(config.backbone, config.layers or None, weights_path)
        _BACKBONES[key] = backbone
    return FeatureExtractor(backbone, config.image_size, config.pool)


def _loader(task: LineTask):  # noqa: ANN202 - uris -> LoadedImages
    """Untiled: images resized to the model input (an array); tiled: prepared (tiles, plan)."""
    if task.model.tile is None:
        return lambda uris: load_images(uris, task.model.image_size, task.storage)
    return lambda uris: load_prepared(uris, task.model, task.storage)


def _check_loaded(
    loaded: LoadedImages, column: str, uri: str, minimum: int, task: LineTask
) -> None:
    good, bad = len(loaded.images), len(loaded.failures)
    total = good + bad
    examples = "; ".join(f"{f.uri}: {f.reason}" for f in loaded.failures[:3])
    examples = f" (e.g. {examples})" if examples else ""
    if good < minimum:
        raise LineDataError(
            f"only {good} of {total} images in {column} {uri} could be decoded, at least "
            f"{minimum} needed{examples}"
        )
    if total and bad / total > task.max_bad_fraction:
        raise LineDataError(
            f"{bad} of {total} images in {column} {uri} are unreadable, more than the "
            f"{task.max_bad_fraction:.0%} tolerated{examples}"
        )


class LineImages(NamedTuple):
    """A line's normal images by use: training, early stopping, calibration (never shared).
    Arrays at the model input (untiled) or lists of prepared (tiles, plan) (tiled models)."""

    train: np.ndarray | list
    early_stopping: np.ndarray | list
    calibration: np.ndarray | list
    holdout: dict[str, list[str]]  # which image URIs served early stopping / calibration
    skipped: int


def _read_split(task: LineTask, reporter: TaskReporter) -> LineImages:
    """Training, early-stopping and calibration images: three disjoint sets.

    Without val_uri the held-out slices come from train_uri (TrainConfig.val_fraction and
    calib_fraction); with val_uri, val_uri is the calibration set and early stopping uses a
    val_fraction slice of train_uri.
    """
    row, opts, cfg, load = task.row, task.storage, task.train, _loader(task)
    reporter.stage("reading images")
    loaded = load(resolve_images(row.train_uri, opts))
    _check_loaded(loaded, "train_uri", row.train_uri, task.min_train_images, task)
    skipped = len(loaded.failures)
    uris = np.array(loaded.uris, dtype=object)
    if row.val_uri is not None:
        val = load(resolve_images(row.val_uri, opts))
        _check_loaded(val, "val_uri", row.val_uri, 1, task)
        split = holdout_splits(len(loaded.images), cfg.val_fraction, 0.0, cfg.seed)
        cal_images, cal_uris = val.images, list(val.uris)
        skipped += len(val.failures)
    else:
        split = holdout_splits(len(loaded.images), cfg.val_fraction, cfg.calib_fraction, cfg.seed)
        cal_images = take(loaded.images, split.calibration)
        cal_uris = list(uris[split.calibration])
    holdout = {"early_stopping": list(uris[split.early_stopping]), "calibration": cal_uris}
    return LineImages(
        take(loaded.images, split.train), take(loaded.images, split.early_stopping), cal_images,
        holdout, skipped,
    )  # fmt: skip


def _eval_samples(task: LineTask) -> list[LabelledSample]:
    """The line's evaluation set: its test set plus the confirmed defects of QA feedback."""
    samples = []
    if task.row.test_uri is not None:
        samples = evaluation.list_eval_samples(task.row.test_uri, task.row.product_line,
                                               task.storage)  # fmt: skip
    return samples + evaluation.feedback_samples(task.feedback)


def _evaluate(
    task: LineTask,
    model: DFRModel,
    calibration: Calibration,
    device: torch.device,
    samples: list[LabelledSample],
) -> dict[str, Any]:
    test = evaluation.load_eval_set(samples, task.model, task.storage)
    if not len(test.images):
        raise LineDataError(f"no readable images in test_uri {task.row.test_uri}")
    return evaluation.evaluate_model(model, calibration, test, device)


def _feedback_normals(task: LineTask) -> LoadedImages | None:
    uris = [r.image_uri for r in task.feedback if r.label == NORMAL]
    return _loader(task)(uris) if uris else None


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _train_once(task: LineTask, reporter: TaskReporter) -> LineResult:
    """A trained and published line's result, but for its attempts and time."""
    row = task.row
    device = pick_device()
    split = _read_split(task, reporter)
    train_images, n_train, skipped = split.train, len(split.train), split.skipped
    normals = _feedback_normals(task)
    if normals is not None:  # confirmed false positives train the model as normal images
        train_images = join(train_images, normals.images)
        n_train, skipped = n_train + len(normals.images), skipped + len(normals.failures)
    weights_path = None
    if task.weights_uri:
        weights_path = str(storage.copy_to_local(task.weights_uri, task.cache_dir, task.storage))
    extractor = get_extractor(task.model, weights_path)
    reporter.stage(f"training on {device.type}: {len(train_images)} images")
    fitted = fit(
        extractor, task.model, task.train, train_images, split.early_stopping, device,
        reporter.epoch,
    )  # fmt: skip
    reporter.stage(f"calibrating on {len(split.calibration)} held-out images")
    calibration = calibrate(fitted.model, split.calibration, task.calibration, device)
    reference = drift_io.make_reference(
        fitted.model, split.calibration, train_images, calibration, device
    )
    metrics: dict[str, Any] = {}
    samples = _eval_samples(task)
    if samples:
        reporter.stage("evaluating")
        metrics = _evaluate(task, fitted.model, calibration, device, samples)
    reporter.stage("promotion gate")
    gate = promotion.gate_candidate(
        task.models_uri, row.product_line, metrics, samples, task.promotion_tolerance,
        task.cache_dir, task.storage, device, get_extractor,
    )  # fmt: skip
    version = registry.new_version()
    extra = {
        "product_line": row.product_line,
        "version": version,
        "weights_uri": task.weights_uri,
        "manifest_row": row.to_dict(),
        "node_id": _node_id(),
        "device": device.type,
        "train_image_count": n_train,
        "skipped_images": skipped,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "drift_reference": reference.to_dict(),
    }
    if task.feedback_uri is not None:
        extra["feedback"] = {
            "uri": task.feedback_uri,
            "sha256": task.feedback_sha256,
            "normals_trained": 0 if normals is None else len(normals.images),
            "defects_evaluated": sum(r.label == DEFECT for r in task.feedback),
        }
    training = {
        **fitted.summary,
        "calibration_config": to_dict(task.calibration),
        "holdout": split.holdout,
    }
    reporter.stage(f"publishing version {version}")
    with tempfile.TemporaryDirectory(prefix="dfr-model-") as tmp:
        save_model(fitted.model, tmp, calibration, training, metrics, extra)
        promotion.write_decision(task.models_uri, row.product_line, version, gate, task.storage)
        registry.publish(
            tmp, task.models_uri, row.product_line, task.storage, version, promote=gate.promote
        )
    return LineResult(
        product_line=row.product_line,
        line=row.line,
        status=OK,
        version=version,
        device=device.type,
        node_id=extra["node_id"],
        train_images=n_train,
        held_out_images=len(split.early_stopping) + len(split.calibration),
        skipped_images=skipped,
        latent_dim=fitted.summary["latent_dim"],
        epochs_run=fitted.summary["epochs_run"],
        image_threshold=calibration.image_threshold,
        pixel_threshold=calibration.pixel_threshold,
        metrics=metrics,
        promoted=gate.promote,
        promotion=promotion.format_comparison(gate) if not gate.promote else gate.reason,
    )


_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


# Failures whose message says everything (no traceback, no exception type in the table).
_DATA_ERRORS = (LineDataError, LabelledSetError, ArtifactError, WeightsNotFoundError, DecodeError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: network and storage hiccups, not data or config."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, _PERMANENT_OS_ERRORS):
        return False
    return isinstance(exc, OSError)


def describe_error(exc: BaseException) -> str:
    """A one-line, credential-free message for the result table."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        text = "out of GPU memory: lower image_size or raise --gpus-per-task"
    elif isinstance(exc, MemoryError):
        text = "out of memory: lower image_size or raise --cpus-per-task"
    elif isinstance(exc, _DATA_ERRORS):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return storage.redact(" ".join(text.split()))


def train_line(task: LineTask, progress: Any | None = None) -> LineResult:
    """Train, calibrate, evaluate and publish one product line; never raises.

    Runs as a Ray task (see run_train_job) but is a plain function, so it can also be called
    directly. `progress` is a ProgressLog actor handle or None.
    """
    torch.set_num_threads(task.threads)
    reporter = TaskReporter(progress, task.row.product_line)
    t0 = time.perf_counter()
    attempt = 0
    while True:
        attempt += 1
        try:
            result = _train_once(task, reporter)
        except Exception as exc:
            if is_transient(exc) and attempt <= task.retries:
                delay = min(task.retry_delay_s * 2 ** (attempt - 1), _MAX_RETRY_DELAY_S)
                reporter.stage(f"transient error, retry {attempt}/{task.retries}: "
                               f"{describe_error(exc)}")  # fmt: skip
                time.sleep(delay)
                continue
            message = describe_error(exc)
            # A traceback helps only for the unexpected; data problems are said in full.
            logger.warning(
                "product line %s failed: %s",
                task.row.product_line,
                message,
                exc_info=not isinstance(exc, _DATA_ERRORS),
            )
            return LineResult(
                task.row.product_line, task.row.line, ERROR, message, attempt,
                round(time.perf_counter() - t0, 2),
            )  # fmt: skip
        return replace(result, attempts=attempt, wall_seconds=round(time.perf_counter() - t0, 2))
