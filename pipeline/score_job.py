"""The scoring job: listing -> Ray Data (read, decode, score) -> per-shard Parquet -> run record.

The driver does what must happen exactly once: resolve the listing into fixed shards, pin each
product line's LATEST model version, skip shards an earlier attempt of the same run committed,
and write each finished shard and, last, the run record. Ray Data does the per-image work,
streaming, so memory is bounded by the blocks in flight, not by the number of images.

Why the driver writes the Parquet files (from ``iter_batches``) instead of ``write_parquet``:
a shard's file name must be deterministic and its commit marker must follow the complete file,
which is what makes reruns idempotent and interrupted runs resumable (see pipeline.outputs).
Score rows are small (images and masks never reach the driver), so this is not a bottleneck.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from dfr_core.artifact_meta import ArtifactError, read_metadata
from pipeline import drift_io, outputs, registry, storage
from pipeline import listing as listing_mod
from pipeline.drift import DriftConfig, LineDrift
from pipeline.imageio import DEFAULT_MAX_PIXELS
from pipeline.io_stages import DecodeConfig, ReadConfig
from pipeline.listing import Listing
from pipeline.ray_runtime import init_ray
from pipeline.resources import ClusterShape, ResourceRequest, plan_resources
from pipeline.run_lease import RunLease
from pipeline.score_graph import build_dataset
from pipeline.score_resume import score_pending, tidy_committed
from pipeline.scoring_config import ScoringConfig
from pipeline.storage import StorageOptions

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = os.path.join(tempfile.gettempdir(), "dfr-pipeline-cache")
#: Input block size in batches: small enough to spread decoding, large enough to keep the
#: number of objects the driver puts into the object store modest.
BLOCK_BATCHES = 4
#: Largest input block of a big run (rows): fewer, larger blocks cost less Ray overhead per row,
#: and a block of a thousand images still spreads over many decode tasks in a long run.
MAX_BLOCK_ROWS = 1024
#: Listing rows per Ray Data execution ("wave"). The driver puts a wave's listing blocks into
#: the object store, where they stay mapped into the driver until the wave ends; waves bound
#: that share of the driver's memory (~130 bytes per row) whatever the size of the listing.
WAVE_ROWS = 1_000_000


class RunInterrupted(RuntimeError):
    """Raised when ``stop_after_shards`` stops a run on purpose (tests, controlled drains)."""


class ShardCountError(RuntimeError):
    """Ray Data returned a different number of rows for a shard than the listing holds."""


class EmptyInput(RuntimeError):
    """The input lists no image (and ``allow_empty`` is off): an upstream export likely broke."""


@dataclass(frozen=True)
class ScoreJobConfig:
    """Everything one scoring run needs; the CLI and the nightly job build one of these."""

    models_uri: str
    input_uri: str
    output_uri: str
    run_date: str  # YYYY-MM-DD: the partition the run writes
    run_id: str | None = None  # None: derived from the date and the run's content
    products: tuple[str, ...] = ()  # empty: every product line in the input
    batch_size: int = 32
    # Resources: None sizes the figure from the cluster (pipeline.resources.plan_resources).
    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    decode_cpus: float | None = None  # per read/decode task
    read_threads: int = 16  # concurrent object reads per read task (S3 is latency bound)
    torch_threads: int | None = None  # intra-op threads per actor
    masks: str = "anomalous"  # which ok rows get a mask: anomalous | all | none
    heatmaps: bool = False  # also write a colour heatmap beside each mask
    shard_size: int = 1000  # rows per committed output file
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = 256 * 2**20
    max_error_fraction: float = 0.1  # above this the run is committed but reported as failed
    cache_dir: str = DEFAULT_CACHE_DIR  # local model/weights cache (driver and actors)
    address: str | None = None  # Ray cluster; None: the running one, or a new local one
    quiet: bool = False
    storage: StorageOptions | None = None  # None: from the environment
    #: An input that lists no image commits an empty run instead of failing (nightly configs
    #: of lines that may have no images some days).
    allow_empty: bool = False
    #: Test/ops knob: stop (RunInterrupted) after committing this many shards.
    stop_after_shards: int | None = None
    drift_level: float = 0.001  # significance level of the drift tests (pipeline.drift)
    drift_min_images: int = 20  # fewer ok rows in a line: never drifted

    @property
    def drift(self) -> DriftConfig:
        return DriftConfig(level=self.drift_level, min_images=self.drift_min_images)

    def __post_init__(self) -> None:
        outputs.check_run_date(self.run_date)
        if self.run_id is not None:
            storage.safe_component(self.run_id, "run id")
        object.__setattr__(self, "products", tuple(self.products))
        for line in self.products:
            storage.safe_component(line, "product line")
        if self.masks not in outputs.MASK_MODES:
            raise ValueError(f"masks must be one of {outputs.MASK_MODES}, got {self.masks!r}")
        for name in ("batch_size", "read_threads", "shard_size", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_actors", "max_actors", "torch_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (
            self.min_actors is not None
            and self.max_actors is not None
            and self.max_actors < self.min_actors
        ):
            raise ValueError(f"max_actors {self.max_actors} < min_actors {self.min_actors}")
        for name in ("cpus_per_actor", "gpus_per_actor"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decode_cpus is not None and self.decode_cpus <= 0:
            raise ValueError(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        if self.stop_after_shards is not None and self.stop_after_shards < 1:
            raise ValueError("stop_after_shards must be >= 1")
        self.drift  # noqa: B018  (validates the drift settings)


@dataclass(frozen=True)
class LineModel:
    """A product line's pinned model, or why its images cannot be scored."""

    product_line: str
    version: str | None
    image_size: int | None
    error_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did; ``format()`` is the summary the CLI prints."""

    run_id: str
    run_key: str
    run_date: str
    record_uri: str
    scores_uri: str
    masks_uri: str
    counts: dict[str, Any]
    models: dict[str, str | None]
    processed: int  # rows scored by this invocation
    skipped: int  # rows of shards committed by an earlier attempt
    seconds: float
    already_committed: bool = False
    max_error_fraction: float = 1.0
    timings: dict[str, float] = field(default_factory=dict)
    drift: tuple[LineDrift, ...] = ()

    @property
    def drifting(self) -> list[LineDrift]:
        """Product lines whose night drifted from their model's reference."""
        return [d for d in self.drift if d.drifted]

    @property
    def error_fraction(self) -> float:
        return self.counts["errors"] / self.counts["rows"] if self.counts["rows"] else 0.0

    @property
    def failed(self) -> bool:
        """More rows failed than the configured fraction allows (the CLI exits non-zero)."""
        return self.error_fraction > self.max_error_fraction

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        c = self.counts
        reasons = ", ".join(f"{k}={v}" for k, v in c["error_reasons"].items()) or "none"
        lines = [
            f"run {self.run_id} ({self.run_date})"
            + (" already committed: nothing to do" if self.already_committed else ""),
            f"  images: {c['rows']} listed, {c['read']} read, {c['ok']} scored, "
            f"{c['anomalous']} anomalous, {c['masks']} masks",
            f"  errors: {c['errors']} ({self.error_fraction:.1%}) by reason: {reasons}",
            f"  this invocation: {self.processed} images in {self.seconds:.1f} s "
            f"({self.images_per_second:.1f} images/s), {self.skipped} skipped as committed",
            "  models: " + ", ".join(f"{k}={v}" for k, v in sorted(self.models.items())),
            f"  scores: {self.scores_uri}",
            f"  masks:  {self.masks_uri}",
            f"  record: {self.record_uri}",
        ]
        lines += [f"  {d.describe()}" for d in self.drifting]
        if self.failed:
            lines.append(
                f"  FAILED: error fraction {self.error_fraction:.1%} exceeds "
                f"{self.max_error_fraction:.1%}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Planning (driver)
# --------------------------------------------------------------------------------------------


def resolve_model(
    config: ScoreJobConfig, line: str, options: StorageOptions, check_head: bool = True
) -> LineModel:
    """Pin ``line``'s LATEST version and check it can score, once, before any Ray work.

    Checking here (registry, checksums of every file, metadata, calibration, weights) turns a
    broken model into ``model_error`` rows for its line instead of a failure inside every
    actor. ``check_head`` also loads the head (and validates the calibration), which needs
    torch: the scoring job passes False so that its driver never imports torch (~1 GB of RSS);
    the actors then load the head the same way (dfr_core.artifact.load_head, weights_only) and
    turn a head that fails to load into ``model_error`` rows of its line.
    """
    try:
        version = registry.latest_version(config.models_uri, line, options)
    except ValueError as exc:
        return LineModel(line, None, None, "model_error", str(exc))
    if version is None:
        return LineModel(
            line, None, None, "no_model", f"no model for product line {line!r} in the registry"
        )
    try:
        directory = registry.fetch(config.models_uri, line, version, config.cache_dir, options)
        meta = read_metadata(directory)
        if check_head:
            from dfr_core.artifact import calibration_of, load_head

            load_head(directory, meta)
            calibration_of(meta)
        if not meta.get("calibration"):
            raise ArtifactError("the model has no calibration (no thresholds)")
        if meta["backbone"].get("weights_sha256") is None:
            raise ArtifactError(
                "trained on a random-init backbone, which cannot be rebuilt identically"
            )
        registry.resolve_weights(meta, config.cache_dir, options)
        image_size = int(meta["model_config"]["image_size"])
    except (ArtifactError, OSError, ValueError, KeyError) as exc:
        message = f"model {line}/{version}: {type(exc).__name__}: {exc}"
        return LineModel(line, version, None, "model_error", storage.redact(message))
    return LineModel(line, version, image_size)


def apply_model_errors(table: pa.Table, models: dict[str, LineModel]) -> pa.Table:
    """Rows of lines without a usable model become error rows (their bytes are never read).

    Vectorised per broken line (a handful), so it costs no Python object per row.
    """
    status, reasons, errors = (table.column(n) for n in ("status", "error_reason", "error"))
    for line, model in sorted(models.items()):
        if model.error_reason is None:
            continue
        hit = pc.and_(pc.equal(table.column("product_line"), line), pc.equal(status, "ok"))
        status = pc.if_else(hit, pa.scalar("error"), status)
        reasons = pc.if_else(hit, pa.scalar(model.error_reason), reasons)
        errors = pc.if_else(hit, pa.scalar(f"{model.error_reason}: {model.error}"), errors)
    for name, values in (("status", status), ("error_reason", reasons), ("error", errors)):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(name), values)
    return table


def run_identity(
    config: ScoreJobConfig, listing: Listing, models: dict[str, LineModel]
) -> tuple[str, str]:
    """(run_id, run_key). The key names the run's files: same content -> same names, so a rerun
    finds its committed shards; a different listing, model or output option -> new names."""
    content = {
        "run_date": config.run_date,
        "input": listing.fingerprint,
        "models": {line: m.version for line, m in sorted(models.items())},
        "masks": config.masks,
        "heatmaps": config.heatmaps,
        "max_pixels": config.max_pixels,
        "max_bytes": config.max_bytes,
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    run_id = config.run_id or f"{config.run_date}-{digest[:12]}"
    return run_id, hashlib.sha256(f"{run_id}\0{digest}".encode()).hexdigest()[:16]


def waves(
    pending: dict[tuple[str, int], tuple[int, int]], wave_rows: int = WAVE_ROWS
) -> list[dict[tuple[str, int], tuple[int, int]]]:
    """Pending shards (in listing order) grouped into waves of at most ``wave_rows`` rows
    (a shard larger than that is a wave of its own)."""
    out: list[dict[tuple[str, int], tuple[int, int]]] = []
    rows = 0
    for key, (offset, length) in sorted(pending.items(), key=lambda kv: kv[1][0]):
        if not out or rows + length > wave_rows:
            out.append({})
            rows = 0
        out[-1][key] = (offset, length)
        rows += length
    return out


def wave_blocks(
    listing: Listing,
    wave: dict[tuple[str, int], tuple[int, int]],
    models: dict[str, LineModel],
    step: int,
) -> list[pa.Table]:
    """The wave's listing rows as Ray Data input blocks of at most ``step`` rows.

    Contiguous shards are read as one range; rows carry their shard id, so blocks need not
    align with shards. Lines without a usable model get their error rows here, per block.
    """
    ranges: list[list[int]] = []
    for offset, length in sorted(wave.values()):
        if ranges and ranges[-1][1] == offset:
            ranges[-1][1] += length
        else:
            ranges.append([offset, offset + length])
    blocks = []
    for start, stop in ranges:
        for piece in listing.rows(start, stop):
            for i in range(0, piece.num_rows, step):
                blocks.append(apply_model_errors(piece.slice(i, step), models))
    return blocks


# --------------------------------------------------------------------------------------------
# Execution (Ray Data)
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Collects scored rows per shard (Ray returns them in any order) and commits each shard as
    soon as all its rows have arrived; only shards in flight are buffered."""

    def __init__(
        self,
        config: ScoreJobConfig,
        run_key: str,
        expected: dict[tuple[str, int], int],
        options: StorageOptions,
    ) -> None:
        self.config = config
        self.run_key = run_key
        self.expected = expected
        self.options = options
        self.buffers: dict[tuple[str, int], list[pa.Table]] = {}
        self.received: dict[tuple[str, int], int] = {}
        self.markers: dict[tuple[str, int], dict[str, Any]] = {}

    def add(self, batch: pa.Table) -> None:
        keys = list(
            zip(
                batch.column("product_line").to_pylist(),
                batch.column("shard").to_pylist(),
                strict=True,
            )
        )
        positions: dict[tuple[str, int], list[int]] = {}
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
        for key, rows in positions.items():
            if key not in self.expected or key in self.markers:
                raise ShardCountError(f"unexpected rows for shard {key}")
            self.buffers.setdefault(key, []).append(batch.take(rows))
            self.received[key] = self.received.get(key, 0) + len(rows)
            if self.received[key] > self.expected[key]:
                raise ShardCountError(f"shard {key}: more rows than the listing holds")
            if self.received[key] == self.expected[key]:
                self._commit(key)

    def _commit(self, key: tuple[str, int]) -> None:
        table = pa.concat_tables(self.buffers.pop(key))
        line, shard = key
        self.markers[key] = outputs.write_shard(
            self.config.output_uri,
            self.config.run_date,
            self.run_key,
            line,
            shard,
            table,
            self.options,
        )
        limit = self.config.stop_after_shards
        if limit is not None and len(self.markers) >= limit:
            raise RunInterrupted(f"stopped after {len(self.markers)} committed shards")

    def check_complete(self) -> None:
        missing = {k: self.received.get(k, 0) for k in self.expected if k not in self.markers}
        if missing:
            raise ShardCountError(f"rows missing from shards (key: rows received): {missing}")


def _ensure_ray(address: str | None) -> bool:
    """Connect to Ray unless already connected; True when this call started it."""
    return init_ray(address)


def resource_request(config: ScoreJobConfig) -> ResourceRequest:
    """The figures the user gave (None: sized from the cluster)."""
    return ResourceRequest(
        min_actors=config.min_actors,
        max_actors=config.max_actors,
        cpus_per_actor=config.cpus_per_actor,
        gpus_per_actor=config.gpus_per_actor,
        decode_cpus=config.decode_cpus,
        torch_threads=config.torch_threads,
    )


def _execute(
    config: ScoreJobConfig,
    listing: Listing,
    pending: dict[tuple[str, int], tuple[int, int]],
    models: dict[str, LineModel],
    run_id: str,
    run_key: str,
    options: StorageOptions,
) -> dict[tuple[str, int], dict[str, Any]]:
    """Score the pending shards through Ray Data, a wave at a time; returns the markers of the
    shards committed."""
    import ray
    from ray.data import DataContext

    started = _ensure_ray(config.address)
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = not config.quiet
        if config.quiet:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            # --quiet asked for no progress bars; Ray Data's "Progress bars disabled" warning
            # about exactly that is noise the user cannot act on.
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        usable = {line: m for line, m in models.items() if m.error_reason is None}
        read = ReadConfig(options, config.read_threads, config.max_bytes)
        decode = DecodeConfig({line: m.image_size for line, m in usable.items()}, config.max_pixels)
        scoring = ScoringConfig(
            models_uri=config.models_uri,
            models={line: m.version for line, m in usable.items()},
            cache_dir=config.cache_dir,
            options=options,
            output_uri=config.output_uri,
            run_date=config.run_date,
            run_id=run_id,
            masks=config.masks,
            heatmaps=config.heatmaps,
            torch_threads=config.torch_threads,
            write_threads=8,
        )
        plan = plan_resources(resource_request(config), ClusterShape.from_ray(), config.max_pixels)
        scoring = replace(scoring, torch_threads=plan.torch_threads)
        if not config.quiet:
            print(f"resources: {plan.describe()}", file=sys.stderr)
        writer = ShardWriter(config, run_key, {k: n for k, (_, n) in pending.items()}, options)
        for wave in waves(pending):
            # Blocks of a few batches (not whole shards), so a small run still spreads its
            # decoding over several tasks; a big one gets larger blocks (less overhead per row).
            rows = sum(n for _, n in wave.values())
            step = max(BLOCK_BATCHES * config.batch_size, min(MAX_BLOCK_ROWS, rows // 64))
            blocks = wave_blocks(listing, wave, models, step)
            ds = build_dataset(blocks, read, decode, scoring, plan, config.batch_size)
            del blocks  # the dataset holds them (in the object store) until the wave ends
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                writer.add(batch)
            del ds
        writer.check_complete()
        return writer.markers
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def _canonical(config: ScoreJobConfig, options: StorageOptions) -> ScoreJobConfig:
    """Absolute URIs, so Ray workers with another working directory agree with the driver."""
    return replace(
        config,
        models_uri=storage.canonical_uri(config.models_uri, options),
        input_uri=storage.canonical_uri(config.input_uri, options),
        output_uri=storage.canonical_uri(config.output_uri, options),
        cache_dir=os.path.abspath(os.path.expanduser(config.cache_dir)),
        storage=options,
    )


def _record(
    config: ScoreJobConfig,
    listing: Listing,
    models: dict[str, LineModel],
    run_id: str,
    run_key: str,
    markers: dict[tuple[str, int], dict[str, Any]],
    counts: dict[str, Any],
    timings: dict[str, float],
    started_at: dt.datetime,
) -> dict[str, Any]:
    files: dict[str, list[str]] = {}
    for (line, _), marker in sorted(markers.items()):
        files.setdefault(line, []).append(marker["file"])
    settings = asdict(config)
    settings.pop("storage")
    return {
        "run_id": run_id,
        "run_key": run_key,
        "run_date": config.run_date,
        "started_at": started_at.isoformat(),
        "committed_at": dt.datetime.now(dt.UTC).isoformat(),
        "input": {
            "uri": config.input_uri,
            "source": listing.source,
            "fingerprint": listing.fingerprint,
            "rows": listing.num_rows,
        },
        "models_uri": config.models_uri,
        "models": {line: m.version for line, m in sorted(models.items())},
        "model_errors": {
            line: m.error for line, m in sorted(models.items()) if m.error_reason is not None
        },
        "counts": counts,
        "timings": timings,
        "files": files,
        "config": settings,
    }


def run_score_job(config: ScoreJobConfig) -> ScoreSummary:
    """Score every image of the input with its line's LATEST model; idempotent and resumable.

    Raises RunInterrupted when ``stop_after_shards`` stops the run, ListingError for an unusable
    listing, and ShardCountError if rows went missing (then nothing is committed).
    """
    t0 = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    options = config.storage or StorageOptions.from_env()
    config = _canonical(config, options)
    listing = listing_mod.load_listing(
        config.input_uri, config.products, config.shard_size, options
    )
    try:
        return _run(config, listing, options, t0, started_at)
    finally:
        listing.close()  # its spill files, if the listing was large


def _run(
    config: ScoreJobConfig,
    listing: Listing,
    options: StorageOptions,
    t0: float,
    started_at: dt.datetime,
) -> ScoreSummary:
    """The job once the listing is resolved (run_score_job closes the listing after it)."""
    t_listing = time.perf_counter()
    models = {
        line: resolve_model(config, line, options, check_head=False)
        for line in listing.product_lines
    }
    run_id, run_key = run_identity(config, listing, models)
    t_models = time.perf_counter()
    output, date = config.output_uri, config.run_date

    def summary(
        counts: dict[str, Any],
        processed: int,
        skipped: int,
        record_uri: str,
        timings: dict[str, float],
        already: bool = False,
        drift: tuple[LineDrift, ...] = (),
    ) -> ScoreSummary:
        return ScoreSummary(
            run_id=run_id,
            run_key=run_key,
            run_date=date,
            record_uri=record_uri,
            scores_uri=f"{output.rstrip('/')}/scores/run_date={date}",
            masks_uri=f"{output.rstrip('/')}/masks/run_date={date}",
            counts=counts,
            models={line: m.version for line, m in models.items()},
            processed=processed,
            skipped=skipped,
            seconds=timings.get("scoring_s", 0.0),
            already_committed=already,
            max_error_fraction=config.max_error_fraction,
            timings=timings,
            drift=drift,
        )

    if listing.num_rows == 0 and not config.allow_empty:
        only = f" for product lines {', '.join(config.products)}" if config.products else ""
        raise EmptyInput(
            f"input {config.input_uri} lists no images{only}; nothing to score (pass "
            "--allow-empty, or allow_empty: true in the nightly config, if that is expected)"
        )

    def already_committed() -> ScoreSummary | None:
        existing = outputs.read_run_record(output, run_id, options)
        if existing is None or existing.get("run_key") != run_key:
            return None
        return summary(
            existing["counts"],
            0,
            existing["counts"]["rows"],
            outputs.run_record_uri(output, run_id),
            {"total_s": time.perf_counter() - t0},
            True,
            drift_io.drift_of_record(existing),
        )

    done_before = already_committed()
    if done_before is not None:
        tidy_committed(output, date, run_id, options)
        return done_before
    # One run per (output, date) at a time: LeaseHeld for the second of two overlapping runs.
    lease = RunLease(output, date, run_id, options)
    lease.acquire()
    try:
        done_meanwhile = already_committed()  # the run we lost a race to may have finished
        if done_meanwhile is not None:
            return done_meanwhile
        # Temp files of killed writers of this date (we hold the lease: nobody else writes).
        outputs.clear_staging(output, date, options)
        slices = listing.shards

        def execute(pending: dict[tuple[str, int], tuple[int, int]]) -> dict:
            return _execute(config, listing, pending, models, run_id, run_key, options)

        done, new = score_pending(output, date, slices, run_key, options, execute)
        t_scoring = time.perf_counter()
        markers = {**done, **new}
        counts = outputs.add_counts({}, {})
        for marker in markers.values():
            counts = outputs.add_counts(counts, marker["counts"])
        if counts["rows"] != listing.num_rows:
            raise ShardCountError(f"committed {counts['rows']} rows for {listing.num_rows} inputs")
        timings = {
            "listing_s": round(t_listing - t0, 3),
            "models_s": round(t_models - t_listing, 3),
            "scoring_s": round(t_scoring - t_models, 3),
        }
        record = _record(
            config, listing, models, run_id, run_key, markers, counts, timings, started_at
        )
        drift = drift_io.run_drift(record, run_key, config.cache_dir, config.drift, options)
        record["drift"] = drift_io.drift_record(drift, output, run_key)
        lease.check()  # fencing: a run that lost its lease never commits over its successor
        record_uri = outputs.write_run_record(output, record, options)
        lines = sorted({line for line, _ in slices})
        outputs.remove_superseded(output, date, run_key, lines, options)
        drift_io.remove_superseded(output, date, run_key, lines, options)
    finally:
        try:
            outputs.clear_staging(output, date, options)
        finally:
            lease.release()
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    skipped = sum(m["counts"]["rows"] for m in done.values())
    return summary(
        counts, listing.num_rows - skipped, skipped, record_uri, timings, drift=tuple(drift)
    )
