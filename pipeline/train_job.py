"""Train one DFR model per manifest row as parallel Ray tasks and publish each to the registry.

The driver validates the whole manifest first (nothing runs if any row is wrong), then submits
one task per product line (:func:`pipeline.train_task.train_line`, which never raises, so one
failing line is reported with its error and the others go on).

Settings precedence for image_size, epochs and backbone: manifest cell > job flag > dfr_core
default, so a job-wide flag can be overridden for the one line that needs it.

Failures: transient storage errors are retried inside the task (see :mod:`pipeline.train_task`);
a worker that dies (OOM-killed, node lost) is re-run by Ray up to `system_retries` times.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import ray
from PIL import Image

from dfr_core.backbones import list_backbones
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.geometry import GeometryError, plan_tiles
from pipeline import promotion, registry, storage
from pipeline.feedback import load_feedback
from pipeline.image_sets import resolve_images
from pipeline.manifest import ManifestCheck, ManifestError, ManifestRow, Problem, load_manifest
from pipeline.model_options import OPTION_NAMES, build_configs
from pipeline.progress import Echo, ProgressLog, ProgressPrinter
from pipeline.ray_runtime import ensure_ray
from pipeline.storage import StorageOptions
from pipeline.train_task import ERROR, OK, LineResult, LineTask, train_line

_POLL_S = 0.5


@dataclass(frozen=True)
class TrainJobConfig:
    """Everything `dfr-pipeline train` does; None settings fall back to dfr_core defaults."""

    manifest_uri: str
    models_uri: str
    backbone: str | None = None
    weights_uri: str | None = None  # backbone weights for every line (default: offline package)
    epochs: int | None = None
    image_size: int | tuple[int, int] | None = None
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


class TrainJobResult(NamedTuple):
    """One result per product line, in manifest order."""

    results: list[LineResult]
    models_uri: str

    @property
    def failed(self) -> list[LineResult]:
        return [r for r in self.results if r.status != OK]


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


def geometry_problems(task: LineTask, options: StorageOptions) -> list[Problem]:
    """A tiled line whose first training image cannot hold one tile (after tile_scale) is a
    manifest problem, reported before anything trains (only that image's header is parsed)."""
    if task.model.tile is None:
        return []
    uris = resolve_images(task.row.train_uri, options)
    if not uris:
        return []
    try:
        with Image.open(io.BytesIO(storage.read_bytes(uris[0], options))) as im:
            width, height = im.size
    except (OSError, ValueError):
        return []  # unreadable: the task reports it with its decode reason
    try:
        plan_tiles(replace(task.model, max_tiles=10**9), height, width)
    except GeometryError as exc:
        column = "tile_scale" if "tile_scale" in task.row.options else "tile"
        return [Problem(task.row.line, column, f"{exc} (first training image {uris[0]})")]
    return []


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


def _collect(ref: Any, task: LineTask) -> LineResult:
    """ray.get one result; a task lost to a worker crash becomes an error row."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, ray.exceptions.OutOfMemoryError):
            text = "killed by Ray's memory monitor (out of memory)"
        else:
            text = f"{type(exc).__name__}: {first}"
        return LineResult(task.row.product_line, task.row.line, ERROR, storage.redact(text[:500]))


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
    problems = [p for task in tasks for p in geometry_problems(task, options)]
    if problems:
        raise ManifestError(config.manifest_uri, problems)
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
    results: dict[str, LineResult] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
            for event in ray.get(actor.drain.remote()):
                printer.handle(event)
            for ref in ready:
                task = pending.pop(ref)
                result = _collect(ref, task)
                results[task.row.product_line] = result
                status = result.version if result.status == OK else result.error
                echo(f"{task.row.product_line.ljust(12)}  {result.status}: {status}")
        for event in ray.get(actor.drain.remote()):
            printer.handle(event)
    finally:
        ray.kill(actor)
    ordered = [results[task.row.product_line] for task in tasks]
    return TrainJobResult(ordered, config.models_uri)
