"""The scoring job: listing -> Ray Data (read, decode, score) -> per-shard Parquet -> run record.

The driver does what must happen exactly once: resolve the listing into fixed shards, pin each
product line's LATEST model version, skip shards an earlier attempt of the same run committed,
and write each finished shard and, last, the run record. Ray Data does the per-image work
(pipeline.score_execute), streaming, so memory is bounded by the blocks in flight, not by the
number of images. The configuration and typed results live in pipeline.score_types.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from dfr_core.artifact_meta import ArtifactError, read_model_metadata
from pipeline import drift_io, outputs, registry, score_execute, storage
from pipeline import listing as listing_mod
from pipeline.drift import LineDrift
from pipeline.listing import Listing
from pipeline.row_errors import ListingReason
from pipeline.run_lease import RunLease
from pipeline.score_execute import (  # noqa: F401 - re-exported: callers use them from here
    MAX_BLOCK_ROWS,
    WAVE_ROWS,
    apply_model_errors,
    resource_request,
    wave_blocks,
    waves,
)
from pipeline.score_resume import score_pending, tidy_committed
from pipeline.score_types import (  # noqa: F401 - re-exported: callers use them from here
    DEFAULT_CACHE_DIR,
    EmptyInput,
    LineModel,
    RunInterrupted,
    ScoreJobConfig,
    ShardCountError,
)
from pipeline.storage import StorageOptions


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
        return LineModel(line, None, None, ListingReason.MODEL_ERROR, str(exc))
    if version is None:
        return LineModel(
            line,
            None,
            None,
            ListingReason.NO_MODEL,
            f"no model for product line {line!r} in the registry",
        )
    try:
        directory = registry.fetch(config.models_uri, line, version, config.cache_dir, options)
        meta = read_model_metadata(directory)
        if check_head:
            from dfr_core.artifact import calibration_of, load_head

            load_head(directory, meta)
            calibration_of(meta)
        meta.require_calibration()
        if meta.backbone.weights_sha256 is None:
            raise ArtifactError(
                "trained on a random-init backbone, which cannot be rebuilt identically"
            )
        registry.resolve_weights(meta.weights_uri, config.cache_dir, options)
        geometry = meta.model_config  # image_size / tile ...: what the decode stage cuts
    except (ArtifactError, OSError, ValueError, KeyError) as exc:
        message = f"model {line}/{version}: {type(exc).__name__}: {exc}"
        return LineModel(line, version, None, ListingReason.MODEL_ERROR, storage.redact(message))
    return LineModel(line, version, geometry)


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
            return score_execute.execute(config, listing, pending, models, run_id, run_key, options)

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
