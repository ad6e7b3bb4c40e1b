"""The scoring job's execution: pending shards -> Ray Data, a wave at a time -> committed shards.

The driver feeds Ray Data the listing rows of the shards still to score, in waves of at most
WAVE_ROWS rows (one Ray Data execution each), and commits each shard as soon as all its rows
came back (:class:`ShardWriter`). Why the driver writes the Parquet files (from
``iter_batches``) instead of ``write_parquet``: a shard's file name must be deterministic and
its commit marker must follow the complete file, which is what makes reruns idempotent and
interrupted runs resumable (see pipeline.outputs). Score rows are small (images and masks
never reach the driver), so this is not a bottleneck.
"""

from __future__ import annotations

import gc
import logging
import sys
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import outputs, storage
from pipeline.io_stages import DecodeConfig, ReadConfig
from pipeline.listing_rows import Listing
from pipeline.ray_runtime import ensure_ray
from pipeline.resources import ClusterShape, ResourceRequest, plan_resources
from pipeline.row_errors import RowStatus, mark_errors
from pipeline.score_graph import build_dataset
from pipeline.score_types import LineModel, RunInterrupted, ScoreJobConfig, ShardCountError
from pipeline.scoring_config import ScoringConfig
from pipeline.storage import StorageOptions

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


def apply_model_errors(table: pa.Table, models: dict[str, LineModel]) -> pa.Table:
    """Rows of lines without a usable model become error rows (their bytes are never read).

    Vectorised per broken line (a handful), so it costs no Python object per row.
    """
    for line, model in sorted(models.items()):
        if model.error_reason is None:
            continue
        ok = pc.equal(table.column("status"), RowStatus.OK.value)
        hit = pc.and_(pc.equal(table.column("product_line"), line), ok)
        table = mark_errors(table, hit, pa.scalar(model.error_reason), pa.scalar(str(model.error)))
    return table


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

    A block never spans two shards, so shards finish one after another (a small run commits
    its first shard early and spreads its decoding over several tasks). Contiguous shards are
    read as one range of the listing. Lines without a usable model get their error rows here.
    """
    ranges: list[list[tuple[int, int]]] = []  # runs of contiguous (offset, length)
    for offset, length in sorted(wave.values()):
        if ranges and sum(ranges[-1][-1]) == offset:
            ranges[-1].append((offset, length))
        else:
            ranges.append([(offset, length)])
    blocks = []
    for shards in ranges:
        start = shards[0][0]
        pieces = listing.rows(start, sum(shards[-1]))
        buffer, buffer_start = pa.table({}), start
        for offset, length in shards:
            for lo in range(offset, offset + length, step):
                hi = min(lo + step, offset + length)
                while buffer.num_rows < hi - buffer_start:
                    piece = next(pieces)
                    buffer = pa.concat_tables([buffer, piece]) if buffer.num_columns else piece
                block = buffer.slice(lo - buffer_start, hi - lo).combine_chunks()
                buffer, buffer_start = buffer.slice(hi - buffer_start), hi
                blocks.append(apply_model_errors(block, models))
    return blocks


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


def first_remote_uri(
    listing: Listing, pending: dict[tuple[str, int], tuple[int, int]], lines: list[str]
) -> str | None:
    """The first S3 image the pending shards will read (rows of ``lines`` still ok), or None.

    One is enough to probe: a job reads every S3 URI through one endpoint.
    """
    wanted = pa.array(lines, pa.string())
    for offset, length in sorted(pending.values()):
        for piece in listing.rows(offset, offset + length):
            uris = piece.column("image_uri")
            read = pc.and_(
                pc.and_(pc.starts_with(uris, "s3://"), pc.equal(piece["status"], RowStatus.OK)),
                pc.is_in(piece["product_line"], value_set=wanted),
            )
            first = pc.index(read, True).as_py()
            if first >= 0:
                return uris[first].as_py()
    return None


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


def execute(
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

    usable = {line: m for line, m in models.items() if m.error_reason is None}
    # Before Ray starts: an unreachable S3 endpoint fails the run here (StorageUnreachable),
    # not row by row after each read's retries, with nothing committed.
    probe = first_remote_uri(listing, pending, sorted(usable))
    if probe is not None:
        storage.check_reachable(probe, options)
    started = ensure_ray(config.address)  # --address: pipeline.ray_runtime
    try:
        context = DataContext.get_current()
        context.enable_progress_bars = not config.quiet
        if config.quiet:
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            # --quiet asked for no progress bars; Ray Data's "Progress bars disabled" warning
            # about exactly that is noise the user cannot act on.
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        read = ReadConfig(options, config.read_threads, config.max_bytes)
        decode = DecodeConfig({line: m.geometry for line, m in usable.items()}, config.max_pixels)
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
            tile_batch=config.batch_size,
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
            try:
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    writer.add(batch)
            finally:
                # Ray Data's handles to the wave's blocks and actors can sit in reference
                # cycles, and this frame stays referenced by the traceback of a run stopped
                # here (stop_after_shards): drop and collect them now, so the object store
                # reuses the wave's memory and the actors give their CPUs back to the next
                # wave or run (see also pipeline.score_resume).
                ds = None
                gc.collect()
        writer.check_complete()
        return writer.markers
    finally:
        if started:
            ray.shutdown()
