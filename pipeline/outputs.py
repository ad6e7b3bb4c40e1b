"""What the scoring job writes and how readers find the committed part of it.

The public read API (:func:`read_scores`, :func:`register_duckdb`, :func:`scores_dataset`), and
the one name under which callers reach the rest: the layout of ``{output}`` (every path a run
writes, the score schema, the error reasons) lives in :mod:`pipeline.output_layout`, the commit
protocol (shard files and markers, run records, removal of superseded runs) in
:mod:`pipeline.run_commit`; both are re-exported here, so ``outputs.X`` keeps working.

Readers see only files named by committed run records, the latest run per
(run_date, product_line) winning (:func:`committed_files`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import storage
from pipeline.output_layout import (
    DECODE_REASONS,
    LISTING_REASONS,
    MASK_MODES,
    PARTITION_SCHEMA,
    READ_REASONS,
    READ_SCHEMA,
    SCORE_SCHEMA,
    TIMESTAMP,
    check_run_date,
    clear_staging,
    encode_heatmap_png,
    encode_mask_png,
    heatmap_uri,
    mask_uri,
    output_root,
    partition_uri,
    relative_to,
    run_record_uri,
    shard_file_name,
    shard_file_uri,
    shard_marker_uri,
    shard_markers_root,
    staging_uri,
)
from pipeline.run_commit import (
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    add_counts,
    committed_files,
    committed_runs,
    committed_shards,
    read_run_record,
    remove_superseded,
    shard_counts,
    write_run_record,
    write_shard,
)
from pipeline.storage import StorageOptions

__all__ = [
    "DECODE_REASONS",
    "LISTING_REASONS",
    "MASK_MODES",
    "PARTITION_SCHEMA",
    "READ_REASONS",
    "READ_SCHEMA",
    "RUN_FORMAT",
    "RUN_FORMAT_VERSION",
    "SCORE_SCHEMA",
    "TIMESTAMP",
    "add_counts",
    "check_run_date",
    "clear_staging",
    "committed_files",
    "committed_runs",
    "committed_shards",
    "encode_heatmap_png",
    "encode_mask_png",
    "heatmap_uri",
    "mask_uri",
    "output_root",
    "partition_uri",
    "read_run_record",
    "read_scores",
    "register_duckdb",
    "relative_to",
    "remove_superseded",
    "run_record_uri",
    "scores_dataset",
    "shard_counts",
    "shard_file_name",
    "shard_file_uri",
    "shard_marker_uri",
    "shard_markers_root",
    "staging_uri",
    "write_run_record",
    "write_shard",
]

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
    root = f"{output_root(output)}/scores"
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
