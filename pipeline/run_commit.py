"""The commit protocol of a scoring run: shard files and markers, run records, supersession.

Why not Ray Data's ``write_parquet``: its write modes cannot make a killed-and-restarted run end
with exactly one row per image. Here every shard of the listing has a deterministic file name,
is written atomically (temp + rename locally, one PUT on S3) and is committed by a small marker
written after it; a resumed run skips committed shards and overwrites the rest. The run record,
written last, is the commit marker readers trust: :func:`committed_files` (and so
:func:`pipeline.outputs.read_scores`) sees only files named by committed run records, the
latest run per (run_date, product_line) winning.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.output_layout import (
    DECODE_REASONS,
    SCORE_SCHEMA,
    output_root,
    partition_uri,
    relative_to,
    run_record_uri,
    shard_file_uri,
    shard_marker_uri,
    shard_markers_root,
    staging_uri,
)
from pipeline.row_errors import RowStatus
from pipeline.storage import StorageOptions

RUN_FORMAT = "dfr-pipeline-run"
RUN_FORMAT_VERSION = 1

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
        "ok": sum(s == RowStatus.OK for s in status),
        "anomalous": sum(bool(a) for a in anomalous),
        "masks": sum(m is not None for m in masks),
        "errors": sum(s != RowStatus.OK for s in status),
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
    root = storage.join_uri(shard_markers_root(output, run_date), run_key)
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
        uris = storage.list_files(
            storage.join_uri(output_root(output), "runs"), (".json",), options
        )
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
    root = output_root(output)
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
    markers_root = shard_markers_root(output, run_date)
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
