"""What the scoring job writes and how readers find the committed part of it.

Layout under ``{output}``::

    scores/run_date=D/product_line=P/part-{shard:05d}-{run_key}.parquet   score rows
    masks/run_date=D/product_line=P/{image_id}.png                        0/255 masks
    masks/run_date=D/product_line=P/{image_id}.heatmap.png                optional heatmaps
    _shards/run_date=D/{run_key}/{P}/{shard:05d}.json                     shard commit markers
    runs/{run_id}.json                                                    run records (commit)
    _staging/run_date=D/                  temp files of in-flight local writes (never read)
    _leases/run_date=D/{generation}.json  the lease of the run in flight (pipeline.run_lease)

Why not Ray Data's ``write_parquet``: its write modes cannot make a killed-and-restarted run end
with exactly one row per image. Here every shard of the listing has a deterministic file name,
is written atomically (temp + rename locally, one PUT on S3) and is committed by a small marker
written after it; a resumed run skips committed shards and overwrites the rest. The run record,
written last, is the commit marker readers trust: :func:`committed_files` and
:func:`read_scores` see only files named by committed run records, the latest run per
(run_date, product_line) winning.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import json
import logging
import posixpath
import re
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from PIL import Image

from pipeline import storage
from pipeline.storage import StorageOptions

logger = logging.getLogger(__name__)

RUN_FORMAT = "dfr-pipeline-run"
RUN_FORMAT_VERSION = 1
MASK_MODES: tuple[str, ...] = ("anomalous", "all", "none")
TIMESTAMP = pa.timestamp("us", tz="UTC")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

#: Error reasons (``error_reason``), by the step that sets them; docs/scoring.md explains each.
LISTING_REASONS: tuple[str, ...] = (
    "bad_uri",
    "bad_product_line",
    "bad_image_id",
    "duplicate_image_id",
    "no_model",
    "model_error",
)
READ_REASONS: tuple[str, ...] = ("not_found", "access_denied", "read_error", "file_too_large")
DECODE_REASONS: tuple[str, ...] = (
    "empty_file",
    "not_an_image",
    "unsupported_format",
    "too_large",
    "truncated",
    "decode_error",
)

#: The columns stored in every score file. ``run_date`` and ``product_line`` are not stored in
#: the files: they are the hive partition columns of the path (see PARTITION_SCHEMA).
SCORE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("threshold", pa.float64()),
        pa.field("pixel_threshold", pa.float64()),
        pa.field("is_anomaly", pa.bool_()),
        pa.field("defect_area_fraction", pa.float64()),
        pa.field("mask_uri", pa.string()),
        pa.field("heatmap_uri", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", TIMESTAMP, nullable=False),
        pa.field("captured_at", TIMESTAMP),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_reason", pa.string()),
        pa.field("error", pa.string()),
        # Ray node whose scoring actor handled the row; null for rows that were already errors
        # before scoring (unreadable, undecodable, no model): shows how work spread over nodes.
        pa.field("node_id", pa.string()),
        # The score `is_anomaly` is decided on (anomaly_score > anomaly_threshold): the model's
        # configured image score (e.g. top-1 % mean fused with the global term, normalised so
        # held-out normal images' q90 -> 0 and q99.5 -> 1). `score` / `threshold` above stay the
        # raw max of the anomaly map and its threshold at the same image FPR. For format-1
        # models both pairs are equal (their image score was the max of the map).
        pa.field("anomaly_score", pa.float64()),
        pa.field("anomaly_threshold", pa.float64()),
        # Input statistics of the resized image (pipeline.input_stats), for the drift watch;
        # null for rows that never decoded.
        pa.field("brightness", pa.float64()),
        pa.field("contrast", pa.float64()),
        pa.field("sharpness", pa.float64()),
    ]
)
PARTITION_SCHEMA = pa.schema(
    [pa.field("run_date", pa.string()), pa.field("product_line", pa.string())]
)
#: What readers get: the file columns plus the partition columns.
READ_SCHEMA = pa.schema(list(SCORE_SCHEMA) + list(PARTITION_SCHEMA))


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def check_run_date(run_date: str) -> str:
    """Validate YYYY-MM-DD (a real date) and return it; it becomes a partition value."""
    if not isinstance(run_date, str) or not _DATE_RE.fullmatch(run_date):
        raise ValueError(f"run_date must be YYYY-MM-DD, got {run_date!r}")
    dt.date.fromisoformat(run_date)
    return run_date


def _root(output: str) -> str:
    return output.rstrip("/") or output


def partition_uri(output: str, kind: str, run_date: str, product_line: str) -> str:
    """``{output}/{kind}/run_date=D/product_line=P`` with D and P validated as path parts."""
    storage.safe_component(kind, "output kind")
    check_run_date(run_date)
    storage.safe_component(product_line, "product line")
    return f"{_root(output)}/{kind}/run_date={run_date}/product_line={product_line}"


def mask_uri(output: str, run_date: str, product_line: str, image_id: str) -> str:
    return storage.join_uri(
        partition_uri(output, "masks", run_date, product_line), f"{image_id}.png"
    )


def heatmap_uri(output: str, run_date: str, product_line: str, image_id: str) -> str:
    return storage.join_uri(
        partition_uri(output, "masks", run_date, product_line), f"{image_id}.heatmap.png"
    )


def shard_file_name(shard: int, run_key: str) -> str:
    return f"part-{shard:05d}-{run_key}.parquet"


def shard_file_uri(output: str, run_date: str, product_line: str, shard: int, run_key: str) -> str:
    return storage.join_uri(
        partition_uri(output, "scores", run_date, product_line), shard_file_name(shard, run_key)
    )


def _markers_root(output: str, run_date: str) -> str:
    return f"{_root(output)}/_shards/run_date={check_run_date(run_date)}"


def shard_marker_uri(
    output: str, run_date: str, run_key: str, product_line: str, shard: int
) -> str:
    return storage.join_uri(
        _markers_root(output, run_date), run_key, product_line, f"{shard:05d}.json"
    )


def staging_uri(output: str, run_date: str) -> str:
    """Where the temp files of a date's local atomic writes live (masks, heatmaps, shard files,
    markers, run records). Readers never look here; the run holding the date's lease empties it
    when it starts and when it ends, so a process killed mid-write leaves debris only here, and
    only until the next run of the same date."""
    return f"{_root(output)}/_staging/run_date={check_run_date(run_date)}"


def clear_staging(output: str, run_date: str, options: StorageOptions | None = None) -> None:
    """Delete the date's staging directory (local outputs only; S3 writes need no temp files).

    Only the holder of the date's lease may call this: nobody else writes there meanwhile.
    """
    uri = staging_uri(output, run_date)
    for attempt in (1, 2):
        try:
            storage.remove_tree(uri, options)
            break
        except OSError as exc:  # a late writer of an interrupted run raced the removal
            if attempt == 2:
                logger.info("staging %s not removed (%s); the next run removes it", uri, exc)
    storage.remove_empty_dir(f"{_root(output)}/_staging")


def run_record_uri(output: str, run_id: str) -> str:
    return storage.join_uri(_root(output), "runs", f"{run_id}.json")


def relative_to(output: str, uri: str) -> str:
    """``uri`` relative to the output root, so run records survive moving the output."""
    root = _root(output) + "/"
    if not uri.startswith(root):
        raise ValueError(f"{uri} is not under {output}")
    return uri[len(root) :]


# --------------------------------------------------------------------------------------------
# Masks and heatmaps
# --------------------------------------------------------------------------------------------


def encode_mask_png(mask: np.ndarray) -> bytes:
    """Boolean (H, W) mask -> 8-bit grayscale PNG with values 0 and 255."""
    buf = io.BytesIO()
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def _heatmap_lut() -> np.ndarray:
    from matplotlib import colormaps  # imported lazily: only heatmap runs pay for it

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def encode_heatmap_png(anomaly_map: np.ndarray, pixel_threshold: float) -> bytes:
    """(H, W) raw anomaly map -> RGB PNG; the pixel threshold sits at mid-scale, so anything
    brighter than the middle of the colour map is inside the mask."""
    scale = 2.0 * pixel_threshold if pixel_threshold > 0 else float(anomaly_map.max()) or 1.0
    index = np.clip(anomaly_map / scale * 255.0, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(_heatmap_lut()[index], mode="RGB").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Shards
# --------------------------------------------------------------------------------------------


def shard_counts(table: pa.Table) -> dict[str, Any]:
    """Counts a summary needs, from rows in SCORE_SCHEMA."""
    status = table.column("status").to_pylist()
    anomalous = table.column("is_anomaly").to_pylist()
    masks = table.column("mask_uri").to_pylist()
    widths = table.column("width").to_pylist()
    reason_list = table.column("error_reason").to_pylist()
    reasons = Counter(r for r in reason_list if r is not None)
    return {
        "rows": table.num_rows,
        # bytes fetched: decoded (width known) or fetched but not decodable
        "read": sum(
            w is not None or r in DECODE_REASONS for w, r in zip(widths, reason_list, strict=True)
        ),
        "ok": sum(s == "ok" for s in status),
        "anomalous": sum(bool(a) for a in anomalous),
        "masks": sum(m is not None for m in masks),
        "errors": sum(s != "ok" for s in status),
        "error_reasons": dict(sorted(reasons.items())),
    }


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum two count dicts of :func:`shard_counts` form."""
    keys = ("rows", "read", "ok", "anomalous", "masks", "errors")
    out = {k: total.get(k, 0) + part.get(k, 0) for k in keys}
    reasons = Counter(total.get("error_reasons", {}))
    reasons.update(part.get("error_reasons", {}))
    out["error_reasons"] = dict(sorted(reasons.items()))
    return out


def write_shard(
    output: str,
    run_date: str,
    run_key: str,
    product_line: str,
    shard: int,
    table: pa.Table,
    options: StorageOptions | None = None,
) -> dict[str, Any]:
    """Write one shard's rows atomically under its deterministic name, then its marker.

    The marker is written second, so a shard is committed only once its file is complete; a
    crash between the two leaves an uncommitted shard that the next attempt rewrites in place.
    Rows are sorted by image id so the file's content does not depend on Ray's arrival order.
    """
    for field in SCORE_SCHEMA:
        # A nullable column a producer does not know about yet (e.g. node_id) is written null,
        # so adding such a column never breaks a writer of the older column set.
        if field.nullable and field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    table = table.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA).sort_by("image_id")
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    uri = shard_file_uri(output, run_date, product_line, shard, run_key)
    staging = staging_uri(output, run_date)
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), options, staging)
    marker = {
        "run_key": run_key,
        "product_line": product_line,
        "shard": shard,
        "file": relative_to(output, uri),
        "counts": shard_counts(table),
    }
    storage.write_text_atomic(
        shard_marker_uri(output, run_date, run_key, product_line, shard),
        json.dumps(marker, sort_keys=True),
        options,
        staging,
    )
    return marker


def committed_shards(
    output: str, run_date: str, run_key: str, options: StorageOptions | None = None
) -> dict[tuple[str, int], dict[str, Any]]:
    """Markers of the shards this run (``run_key``) already committed: {(line, shard): marker}.

    One listing of the run's marker prefix, rather than one existence check per shard.
    """
    root = storage.join_uri(_markers_root(output, run_date), run_key)
    try:
        uris = storage.list_files(root, (".json",), options)
    except FileNotFoundError:
        return {}
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for uri in uris:
        if posixpath.basename(uri).startswith("."):
            continue  # a local temp file of an interrupted marker write
        marker = json.loads(storage.read_text(uri, options))
        if marker.get("run_key") == run_key:
            found[(marker["product_line"], int(marker["shard"]))] = marker
    return found


# --------------------------------------------------------------------------------------------
# Run records
# --------------------------------------------------------------------------------------------


def write_run_record(output: str, record: dict[str, Any], options: StorageOptions | None) -> str:
    """Write ``runs/{run_id}.json`` atomically: the moment the run becomes visible to readers."""
    uri = run_record_uri(output, record["run_id"])
    full = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **record}
    text = json.dumps(full, indent=2, sort_keys=True, default=str)
    storage.write_text_atomic(uri, text, options, staging_uri(output, record["run_date"]))
    return uri


def read_run_record(
    output: str, run_id: str, options: StorageOptions | None = None
) -> dict[str, Any] | None:
    """The committed record of ``run_id``, or None when that run has not committed."""
    try:
        record = json.loads(storage.read_text(run_record_uri(output, run_id), options))
    except FileNotFoundError:
        return None
    return record if record.get("format") == RUN_FORMAT else None


def committed_runs(output: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """All committed run records, oldest commit first."""
    try:
        uris = storage.list_files(storage.join_uri(_root(output), "runs"), (".json",), options)
    except FileNotFoundError:
        return []
    records = []
    for uri in uris:
        if posixpath.basename(uri).startswith("."):
            continue
        record = json.loads(storage.read_text(uri, options))
        if record.get("format") == RUN_FORMAT:
            records.append(record)
    return sorted(records, key=lambda r: (r["committed_at"], r["run_id"]))


def committed_files(
    output: str, run_date: str | None = None, options: StorageOptions | None = None
) -> list[str]:
    """URIs of the score files readers should see: for every (run_date, product_line), the files
    of the latest committed run that scored it. Older runs of the same date and line are
    superseded (a rerun replaces, never adds)."""
    latest: dict[tuple[str, str], list[str]] = {}
    for record in committed_runs(output, options):
        if run_date is not None and record["run_date"] != run_date:
            continue
        for line, files in record["files"].items():
            latest[(record["run_date"], line)] = files
    root = _root(output)
    return [f"{root}/{rel}" for key in sorted(latest) for rel in latest[key]]


def remove_superseded(
    output: str,
    run_date: str,
    run_key: str,
    product_lines: list[str],
    options: StorageOptions | None = None,
) -> int:
    """After a commit, delete other runs' score files and markers for the same date and lines.

    Readers going through :func:`committed_files` would ignore them anyway; deleting them keeps a
    plain glob over ``scores/`` (pandas, DuckDB) free of duplicates once no run is in flight.
    Returns the number of objects removed.
    """
    doomed: list[str] = []
    suffix = f"-{run_key}.parquet"
    for line in product_lines:
        try:
            partition = partition_uri(output, "scores", run_date, line)
            files = storage.list_files(partition, None, options)
        except FileNotFoundError:
            files = []
        doomed.extend(f for f in files if not f.endswith(suffix))
    markers_root = _markers_root(output, run_date)
    try:
        markers = storage.list_files(markers_root, None, options)
    except FileNotFoundError:
        markers = []
    wanted = set(product_lines)
    for uri in markers:
        parts = relative_to(markers_root, uri).split("/")
        if len(parts) == 3 and parts[0] != run_key and parts[1] in wanted:
            doomed.append(uri)
    for uri in doomed:
        storage.remove_tree(uri, options)
    return len(doomed)


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


def scores_dataset(
    output: str,
    run_date: str | None = None,
    committed_only: bool = True,
    options: StorageOptions | None = None,
) -> pads.Dataset:
    """A lazy pyarrow dataset over the scores (partition columns included, as strings).

    ``committed_only=False`` reads every file under ``scores/``, including those of a run still
    in flight; use it only to debug a run.
    """
    root = f"{_root(output)}/scores"
    fs, base = storage.pyarrow_fs(root, options)
    partitioning = pads.partitioning(PARTITION_SCHEMA, flavor="hive")
    if committed_only:
        uris = committed_files(output, run_date, options)
        paths = [storage.pyarrow_fs(uri, options)[1] for uri in uris]
        return pads.dataset(
            paths,
            schema=READ_SCHEMA,
            format="parquet",
            filesystem=fs,
            partitioning=partitioning,
            partition_base_dir=base,
        )
    if not storage.exists(root, options):
        return pads.dataset([], schema=READ_SCHEMA, format="parquet", filesystem=fs)
    dataset = pads.dataset(
        base, schema=READ_SCHEMA, format="parquet", filesystem=fs, partitioning=partitioning
    )
    if run_date is None:
        return dataset
    return dataset.filter(pads.field("run_date") == check_run_date(run_date))


def read_scores(
    output: str,
    run_date: str | None = None,
    committed_only: bool = True,
    options: StorageOptions | None = None,
) -> pd.DataFrame:
    """Score rows as a DataFrame, sorted by (run_date, product_line, image_id).

    Only rows of committed runs by default (see :func:`committed_files`).
    """
    table = scores_dataset(output, run_date, committed_only, options).to_table()
    table = table.sort_by(
        [("run_date", "ascending"), ("product_line", "ascending"), ("image_id", "ascending")]
    )
    return table.to_pandas(types_mapper=_PANDAS_TYPES.get)


#: Nullable pandas dtypes, so error rows (null width, is_anomaly) keep ints ints and bools bools.
_PANDAS_TYPES = {pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}


def register_duckdb(
    con: Any,
    output: str,
    view: str = "scores",
    run_date: str | None = None,
    options: StorageOptions | None = None,
) -> None:
    """Expose the committed scores to a DuckDB connection as ``view`` (lazy, filter pushdown).

    Works for local and S3 outputs alike, since pyarrow does the I/O (no httpfs extension).
    """
    storage.safe_component(view, "view name")
    con.register(view, scores_dataset(output, run_date, True, options))
