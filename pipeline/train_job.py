"""Train one DFR model per manifest row as parallel Ray tasks and publish each to the registry.

The driver validates the whole manifest first (nothing runs if any row is wrong), then submits
one task per product line. Each task reads its images through the storage layer, fits,
calibrates, optionally evaluates, saves an artifact and publishes it; it returns a plain result
dict and never raises, so one failing line is reported with its error and the others go on.

Settings precedence for image_size, epochs and backbone: manifest cell > job flag > dfr_core
default, so a job-wide flag can be overridden for the one line that needs it.

Failures: transient storage errors (connection resets, timeouts, throttling surfacing as
OSError) are retried inside the task up to `retries` times; data errors are not, since they
would fail again. A worker that dies (OOM-killed, node lost) is re-run by Ray up to
`system_retries` times.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np
import ray
import torch

from dfr_core.artifact import ArtifactError, save_model
from dfr_core.backbones import FeatureBackbone, WeightsNotFoundError, build_backbone, list_backbones
from dfr_core.calibrate import Calibration, calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig, to_dict
from dfr_core.decode import DecodeError
from dfr_core.device import pick_device
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRModel
from dfr_core.train import fit, holdout_splits
from pipeline import drift_io, evaluation, promotion, registry, storage
from pipeline.feedback import DEFECT, NORMAL, FeedbackRow, load_feedback
from pipeline.image_sets import LoadedImages, load_images, resolve_images
from pipeline.manifest import ManifestCheck, ManifestError, ManifestRow, Problem, load_manifest
from pipeline.model_options import OPTION_NAMES, build_configs
from pipeline.mvtec_remote import LabelledSample, LabelledSetError
from pipeline.progress import Echo, ProgressLog, ProgressPrinter, TaskReporter
from pipeline.ray_runtime import ensure_ray
from pipeline.storage import StorageOptions

logger = logging.getLogger(__name__)

OK = "ok"
ERROR = "error"
_POLL_S = 0.5
_MAX_RETRY_DELAY_S = 30.0


@dataclass(frozen=True)
class TrainJobConfig:
    """Everything `dfr-pipeline train` does; None settings fall back to dfr_core defaults."""

    manifest_uri: str
    models_uri: str
    backbone: str | None = None
    weights_uri: str | None = None  # backbone weights for every line (default: offline package)
    epochs: int | None = None
    image_size: int | None = None
    address: str | None = None  # None: start a local Ray; "auto", "host:port", "ray://..."
    gpus_per_task: float = 0.0
    cpus_per_task: float = 1.0
    only: tuple[str, ...] = ()
    retries: int = 2  # transient (storage) failures retried per product line
    retry_delay_s: float = 2.0  # first retry delay, doubled per attempt (capped at 30 s)
    system_retries: int = 1  # Ray re-runs of a task whose worker died
    min_train_images: int = 4
    max_bad_fraction: float = 0.25  # unreadable training images tolerated before a line fails
    seed: int = 0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    cache_dir: str | None = None  # local folder for downloaded weights (default: temp dir)
    storage: StorageOptions | None = None  # None: StorageOptions.from_env()
    progress_interval_s: float = 2.0  # fewest seconds between epoch lines of one product
    #: job-wide model options (pipeline.model_options names -> typed values); rows override
    model_options: dict[str, Any] = field(default_factory=dict)
    feedback_uri: str | None = None  # QA verdicts (pipeline.feedback)
    promotion_tolerance: float = promotion.DEFAULT_TOLERANCE  # the promotion gate's slack

    def __post_init__(self) -> None:
        object.__setattr__(self, "only", tuple(self.only))
        if self.gpus_per_task < 0:
            raise ValueError(f"gpus_per_task must be >= 0, got {self.gpus_per_task}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        for name in ("retries", "system_retries", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.image_size is not None:
            ModelConfig(image_size=self.image_size)  # raises with the rule in the message
        if self.backbone is not None and self.backbone not in list_backbones():
            raise ValueError(
                f"unknown backbone {self.backbone!r}; known: {', '.join(list_backbones())}"
            )
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")
        if self.retry_delay_s < 0:
            raise ValueError(f"retry_delay_s must be >= 0, got {self.retry_delay_s}")
        unknown = sorted(set(self.model_options) - set(OPTION_NAMES))
        if unknown:
            raise ValueError(f"unknown model options {unknown}; known: {', '.join(OPTION_NAMES)}")
        build_configs({}, self.model_options, {}, {}, self.calibration)  # raises on bad values


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


class TrainJobResult(NamedTuple):
    """One result dict per product line, in manifest order."""

    results: list[dict[str, Any]]
    models_uri: str

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.results if r["status"] != OK]


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
    """A line's normal images by use: training, early stopping, calibration (never shared)."""

    train: np.ndarray
    early_stopping: np.ndarray
    calibration: np.ndarray
    holdout: dict[str, list[str]]  # which image URIs served early stopping / calibration
    skipped: int


def _read_split(task: LineTask, reporter: TaskReporter) -> LineImages:
    """Training, early-stopping and calibration images: three disjoint sets.

    Without val_uri the held-out slices come from train_uri (TrainConfig.val_fraction and
    calib_fraction); with val_uri, val_uri is the calibration set and early stopping uses a
    val_fraction slice of train_uri.
    """
    row, size, opts, cfg = task.row, task.model.image_size, task.storage, task.train
    reporter.stage("reading images")
    loaded = load_images(resolve_images(row.train_uri, opts), size, opts)
    _check_loaded(loaded, "train_uri", row.train_uri, task.min_train_images, task)
    skipped = len(loaded.failures)
    uris = np.array(loaded.uris, dtype=object)
    if row.val_uri is not None:
        val = load_images(resolve_images(row.val_uri, opts), size, opts)
        _check_loaded(val, "val_uri", row.val_uri, 1, task)
        split = holdout_splits(len(loaded.images), cfg.val_fraction, 0.0, cfg.seed)
        cal_images, cal_uris = val.images, list(val.uris)
        skipped += len(val.failures)
    else:
        split = holdout_splits(len(loaded.images), cfg.val_fraction, cfg.calib_fraction, cfg.seed)
        cal_images, cal_uris = loaded.images[split.calibration], list(uris[split.calibration])
    holdout = {"early_stopping": list(uris[split.early_stopping]), "calibration": cal_uris}
    return LineImages(
        loaded.images[split.train], loaded.images[split.early_stopping], cal_images, holdout,
        skipped,
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
    test = evaluation.load_eval_set(samples, task.model.image_size, task.storage)
    if not len(test.images):
        raise LineDataError(f"no readable images in test_uri {task.row.test_uri}")
    return evaluation.evaluate_model(model, calibration, test, device)


def _feedback_normals(task: LineTask) -> LoadedImages | None:
    uris = [r.image_uri for r in task.feedback if r.label == NORMAL]
    return load_images(uris, task.model.image_size, task.storage) if uris else None


def _node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _train_once(task: LineTask, reporter: TaskReporter) -> dict[str, Any]:
    row = task.row
    device = pick_device()
    split = _read_split(task, reporter)
    train_images, n_train, skipped = split.train, len(split.train), split.skipped
    normals = _feedback_normals(task)
    if normals is not None:  # confirmed false positives train the model as normal images
        train_images = np.concatenate([train_images, normals.images])
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
    return {
        "version": version,
        "device": device.type,
        "node_id": extra["node_id"],
        "train_images": n_train,
        "held_out_images": len(split.early_stopping) + len(split.calibration),
        "skipped_images": skipped,
        "latent_dim": fitted.summary["latent_dim"],
        "epochs_run": fitted.summary["epochs_run"],
        "image_threshold": calibration.image_threshold,
        "pixel_threshold": calibration.pixel_threshold,
        "metrics": metrics,
        "promoted": gate.promote,
        "promotion": promotion.format_comparison(gate) if not gate.promote else gate.reason,
    }


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


def train_line(task: LineTask, progress: Any | None = None) -> dict[str, Any]:
    """Train, calibrate, evaluate and publish one product line; never raises.

    Runs as a Ray task (see run_train_job) but is a plain function, so it can also be called
    directly. `progress` is a ProgressLog actor handle or None.
    """
    torch.set_num_threads(task.threads)
    reporter = TaskReporter(progress, task.row.product_line)
    base = {"product_line": task.row.product_line, "line": task.row.line}
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
            return {
                **base,
                "status": ERROR,
                "error": message,
                "attempts": attempt,
                "wall_seconds": round(time.perf_counter() - t0, 2),
            }
        return {
            **base,
            **result,
            "status": OK,
            "error": None,
            "attempts": attempt,
            "wall_seconds": round(time.perf_counter() - t0, 2),
        }


# --------------------------------------------------------------------------------------------
# driver


def build_tasks(
    config: TrainJobConfig, rows: list[ManifestRow], options: StorageOptions
) -> list[LineTask]:
    """Per-line configs (manifest cell > flag > default); a --weights conflict is an error."""
    job_backbone = config.backbone or ModelConfig().backbone
    conflicts = [
        Problem(row.line, "backbone", f"{row.backbone!r} differs from the job's backbone "
                f"{job_backbone!r}, which the --weights file is for")
        for row in rows
        if config.weights_uri and row.backbone and row.backbone != job_backbone
    ]  # fmt: skip
    if conflicts:
        raise ManifestError(config.manifest_uri, conflicts)
    cache_dir = config.cache_dir or os.path.join(tempfile.gettempdir(), "dfr-pipeline-cache")
    tasks = []
    problems: list[Problem] = []
    built = []
    for row in rows:
        explicit = {"backbone": row.backbone or config.backbone}
        explicit["image_size"] = row.image_size or config.image_size
        try:
            configs = build_configs(
                row.options,
                config.model_options,
                {k: v for k, v in explicit.items() if v is not None},
                {
                    "epochs": row.epochs or config.epochs or TrainConfig().epochs,
                    "seed": config.seed,
                },
                config.calibration,
            )
        except ValueError as exc:
            column, _, message = str(exc).partition(": ")
            problems.append(Problem(row.line, column, message))
            continue
        built.append((row, configs))
    if problems:
        raise ManifestError(config.manifest_uri, problems)
    for row, (model, train, calibration) in built:
        tasks.append(
            LineTask(
                row=row,
                model=model,
                train=train,
                calibration=calibration,
                models_uri=config.models_uri,
                weights_uri=config.weights_uri,
                storage=options,
                min_train_images=config.min_train_images,
                max_bad_fraction=config.max_bad_fraction,
                retries=config.retries,
                retry_delay_s=config.retry_delay_s,
                cache_dir=cache_dir,
                threads=max(1, int(round(config.cpus_per_task))),
            )
        )
    return tasks


def _ensure_ray(config: TrainJobConfig) -> bool:
    """Start or join Ray unless this process already did; True when we must shut it down."""
    return ensure_ray(config.address, log_to_driver=True)  # --address: pipeline.ray_runtime


def _check_resources(config: TrainJobConfig, local: bool, echo: Echo) -> None:
    """A request no node can ever meet leaves tasks pending forever: say so instead."""
    total = ray.cluster_resources()
    for flag, want, have in (
        ("--gpus-per-task", config.gpus_per_task, total.get("GPU", 0.0)),
        ("--cpus-per-task", config.cpus_per_task, total.get("CPU", 0.0)),
    ):
        if want > have:
            message = f"{flag} {want:g} but the Ray cluster has {have:g} in total"
            if local:
                raise ValueError(message)
            echo(f"warning: {message}; tasks wait until the cluster scales up")


def _collect(ref: Any, task: LineTask) -> dict[str, Any]:
    """ray.get one result; a task lost to a worker crash becomes an error row."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, ray.exceptions.OutOfMemoryError):
            text = "killed by Ray's memory monitor (out of memory)"
        else:
            text = f"{type(exc).__name__}: {first}"
        return {
            "product_line": task.row.product_line,
            "line": task.row.line,
            "status": ERROR,
            "error": storage.redact(text[:500]),
            "attempts": None,
            "wall_seconds": None,
        }


def run_train_job(config: TrainJobConfig, echo: Echo | None = None) -> TrainJobResult:
    """Validate the manifest, train every selected line on Ray, publish; results per line.

    Raises ManifestError (nothing trained) for a bad manifest. Product-line failures do not
    raise: they are rows with status "error". Joins an already-initialised Ray if there is one.
    """
    echo = echo or (lambda text: None)
    options = config.storage or StorageOptions.from_env()
    check = ManifestCheck(
        min_train_images=config.min_train_images, only=config.only, options=options
    )
    rows = load_manifest(config.manifest_uri, check)
    if config.weights_uri and not storage.exists(config.weights_uri, options):
        raise FileNotFoundError(f"--weights {config.weights_uri}: not found")
    tasks = _with_feedback(config, build_tasks(config, rows, options), options)
    echo(f"manifest OK: {len(tasks)} product line{'s' if len(tasks) != 1 else ''}")
    started = _ensure_ray(config)
    try:
        _check_resources(config, started and config.address is None, echo)
        return _run_tasks(config, tasks, echo)
    finally:
        if started:
            ray.shutdown()


def _with_feedback(
    config: TrainJobConfig, tasks: list[LineTask], options: StorageOptions
) -> list[LineTask]:
    """Validate the feedback table (FeedbackError: nothing trains) and give each line its rows."""
    tasks = [replace(t, promotion_tolerance=config.promotion_tolerance) for t in tasks]
    if config.feedback_uri is None:
        return tasks
    known = {t.row.product_line for t in tasks}
    known |= {
        line
        for line in registry.list_product_lines(config.models_uri, options)
        if registry.latest_version(config.models_uri, line, options) is not None
    }
    feedback = load_feedback(config.feedback_uri, known, options)
    return [
        replace(
            task,
            feedback=feedback.for_line(task.row.product_line),
            feedback_uri=feedback.uri,
            feedback_sha256=feedback.sha256,
        )
        for task in tasks
    ]


def _run_tasks(config: TrainJobConfig, tasks: list[LineTask], echo: Echo) -> TrainJobResult:
    printer = ProgressPrinter(echo, config.progress_interval_s)
    actor = ray.remote(num_cpus=0)(ProgressLog).remote()
    remote = ray.remote(train_line)
    pending = {
        remote.options(
            num_cpus=config.cpus_per_task,
            num_gpus=config.gpus_per_task,
            max_retries=config.system_retries,
            retry_exceptions=False,
            name=f"train-{task.row.product_line}",
        ).remote(task, actor): task
        for task in tasks
    }
    results: dict[str, dict[str, Any]] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            for event in ray.get(actor.drain.remote()):
                printer.handle(event)
            for ref in ready:
                task = pending.pop(ref)
                result = _collect(ref, task)
                results[task.row.product_line] = result
                status = result["version"] if result["status"] == OK else result["error"]
                echo(f"{task.row.product_line.ljust(12)}  {result['status']}: {status}")
        for event in ray.get(actor.drain.remote()):
            printer.handle(event)
    finally:
        ray.kill(actor)
    ordered = [results[task.row.product_line] for task in tasks]
    return TrainJobResult(ordered, config.models_uri)
