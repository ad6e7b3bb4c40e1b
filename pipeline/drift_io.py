"""The drift watch around the pure statistics of pipeline.drift: the reference a model stores
when it is calibrated, the ``drift`` table a scoring run writes, and its readers.

Layout (partitioned like the scores; ``run_date`` and ``product_line`` are hive partition
columns of the path, not stored in the file)::

    drift/run_date=D/product_line=P/drift-{run_key}.parquet     one row (DRIFT_SCHEMA)

The run record names every drift file it wrote (``drift.lines[P].file``), and readers go
through committed run records, as for scores: a run that crashed before its record never
shows. After the commit, drift files of superseded runs of the same date and line are removed.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dfr_core.artifact_meta import ArtifactError, ModelMetadata, read_model_metadata
from pipeline import outputs, registry, storage
from pipeline.drift import SCORE_COLUMN, DriftConfig, DriftReference, LineDrift, compute_drift
from pipeline.input_stats import STAT_NAMES, batch_stats, tiles_stats
from pipeline.row_errors import RowStatus
from pipeline.storage import StorageOptions

if TYPE_CHECKING:  # the training-side helpers need torch; the scoring driver imports none
    import torch

    from dfr_core.calibrate import Calibration
    from dfr_core.model import DFRModel

KIND = "drift"
#: Most ok rows per line the drift tests of a run read (a uniform sample beyond it): the KS
#: tests compare with a reference of at most MAX_REFERENCE values, so more rows add memory, not
#: power. The anomaly rate always counts every row.
MAX_DRIFT_ROWS = 200_000
#: Most values per reference list kept in model.json (a random, seeded subset beyond it).
MAX_REFERENCE = 2000
_F = pa.float64()
#: Columns stored in every drift file (partition columns: see PARTITION_SCHEMA below).
DRIFT_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model_version", pa.string()),
        pa.field("n_ok", pa.int64(), nullable=False),
        pa.field("n_anomalous", pa.int64(), nullable=False),
        pa.field("anomaly_rate", _F),
        pa.field("expected_rate", _F),
        pa.field("anomaly_p", _F),
        pa.field("score_ks", _F),
        pa.field("score_p", _F),
        *(pa.field(f"{name}_{kind}", _F) for name in STAT_NAMES for kind in ("ks", "p")),
        pa.field("level", _F, nullable=False),
        pa.field("drifted", pa.bool_(), nullable=False),
        pa.field("reasons", pa.string(), nullable=False),
        pa.field("note", pa.string()),
    ]
)
PARTITION_SCHEMA = outputs.PARTITION_SCHEMA
READ_COLUMNS = ["run_date", "product_line", *DRIFT_SCHEMA.names]
#: Score-table columns the statistics read.
ROW_COLUMNS = ["status", SCORE_COLUMN, "is_anomaly", *STAT_NAMES]


# --------------------------------------------------------------------------------------------
# The reference (training side)


def _subsample(values: list[float], seed: int = 0) -> tuple[float, ...]:
    if len(values) <= MAX_REFERENCE:
        return tuple(float(v) for v in values)
    idx = np.sort(np.random.default_rng(seed).choice(len(values), MAX_REFERENCE, replace=False))
    return tuple(float(values[i]) for i in idx)


def make_reference(
    model: DFRModel,
    calibration_images: np.ndarray | list,
    train_images: np.ndarray | list,
    calibration: Calibration,
    device: torch.device | None = None,
) -> DriftReference:
    """Scores of the calibration images (the same forward pass as calibration) and input
    statistics of every normal image the line was trained and calibrated on.

    A tiled model's images come prepared (lists of (tiles, plan)): its scores are the stitched
    images' (dfr_core.inference.forward_images) and its input statistics are per IMAGE, pooled
    over its tiles (input_stats.tiles_stats), exactly what the scoring job's decode stage
    records per row: the drift test compares like with like."""
    from dfr_core.calibrate import compute_maps
    from dfr_core.inference import forward_images

    if not isinstance(calibration_images, np.ndarray):
        if device is not None:
            model.to(device)
        model.eval()
        scores = [o.score for o in forward_images(model, calibration_images)]
        values = [tiles_stats(tiles) for tiles, _ in [*train_images, *calibration_images]]
        inputs = {name: [v[k] for v in values] for k, name in enumerate(STAT_NAMES)}
    else:
        scores = compute_maps(model, calibration_images, device).score.numpy().tolist()
        normals = (
            np.concatenate([train_images, calibration_images])
            if len(train_images)
            else (calibration_images)
        )
        inputs = batch_stats(normals)
    return DriftReference(
        image_scores=_subsample(scores),
        image_threshold=float(calibration.image_threshold),
        image_fpr=float(calibration.image_fpr),
        input_stats={name: _subsample(values) for name, values in inputs.items()},
    )


def rows_of_images(
    model: DFRModel,
    calibration: Calibration,
    images: np.ndarray,
    device: torch.device | None = None,
) -> dict[str, list[Any]]:
    """The columns compute_drift reads, for images scored in process (benchmarks, tests and
    offline checks): the same forward pass and statistics as the scoring job."""
    from dfr_core.calibrate import compute_maps

    scores = compute_maps(model, images, device).score.numpy().tolist()
    inputs = batch_stats(images)
    return {
        "status": [RowStatus.OK.value] * len(scores),
        SCORE_COLUMN: scores,
        "is_anomaly": [s > calibration.image_threshold for s in scores],
        **inputs,
    }


def reference_of(meta: ModelMetadata) -> DriftReference | None:
    """The reference stored in a model.json, or None for a model trained without one."""
    data = meta.drift_reference
    return DriftReference.from_dict(data) if data else None


# --------------------------------------------------------------------------------------------
# The drift table (scoring side)


def drift_file_uri(output: str, run_date: str, product_line: str, run_key: str) -> str:
    partition = outputs.partition_uri(output, KIND, run_date, product_line)
    return storage.join_uri(partition, f"drift-{run_key}.parquet")


def _sample_keys(ids: list[str]) -> np.ndarray:
    """A uniform, deterministic 64-bit key per image id (the sample keeps the smallest)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids),
        dtype=np.uint64,
        count=len(ids),
    )


def _read_rows(
    output: str, files: list[str], options: StorageOptions | None, limit: int = MAX_DRIFT_ROWS
) -> tuple[dict[str, list], tuple[int, int]]:
    """The ok rows of a line's score files (at most ``limit``, a uniform sample by image id
    beyond it) and the exact (ok rows, anomalous rows) of all of them.

    Bounded, because a night of millions of images must not hold a Python object per row:
    read a file at a time, keep the ``limit`` rows with the smallest keys of their image ids.
    """
    root = output.rstrip("/")
    kept = None
    n_ok = n_anom = 0
    for rel in files:
        source = pq.ParquetFile(io.BytesIO(storage.read_bytes(f"{root}/{rel}", options)))
        names = set(source.schema_arrow.names)
        table = source.read(columns=[c for c in ["image_id", *ROW_COLUMNS] if c in names])
        table = table.filter(pc.equal(table.column("status"), RowStatus.OK.value))
        n_ok += table.num_rows
        n_anom += int(pc.sum(pc.fill_null(table.column("is_anomaly"), False)).as_py() or 0)
        keys = _sample_keys(table.column("image_id").to_pylist())
        table = table.append_column("_key", pa.array(keys, pa.uint64()))
        kept = table if kept is None else pa.concat_tables([kept, table], promote_options="default")
        if kept.num_rows > 2 * limit:
            kept = _smallest(kept, limit)
    if kept is None:
        return {name: [] for name in ROW_COLUMNS}, (0, 0)
    kept = _smallest(kept, limit)
    rows = {
        name: kept.column(name).to_pylist() for name in kept.column_names if name in ROW_COLUMNS
    }
    return rows, (n_ok, n_anom)


def _smallest(table: pa.Table, limit: int) -> pa.Table:
    if table.num_rows <= limit:
        return table
    keys = table.column("_key").to_numpy()
    return table.take(pa.array(np.sort(np.argpartition(keys, limit)[:limit])))


def write_line_drift(
    output: str, run_key: str, drift: LineDrift, options: StorageOptions | None
) -> str:
    """Write one line's drift row atomically; returns its URI."""
    row = drift.to_dict()
    table = pa.Table.from_pylist([{k: row[k] for k in DRIFT_SCHEMA.names}], schema=DRIFT_SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    uri = drift_file_uri(output, drift.run_date, drift.product_line, run_key)
    staging = outputs.staging_uri(output, drift.run_date)  # temp files where readers never look
    storage.write_bytes_atomic(uri, buf.getvalue().to_pybytes(), options, staging)
    return uri


def _reference_for(
    models_uri: str, line: str, version: str, cache_dir: str, options: StorageOptions | None
) -> DriftReference | None:
    """None when the model has no reference, or cannot be read (its rows are model_error rows
    then, and a broken model must not stop the run from committing)."""
    try:
        directory = registry.fetch(models_uri, line, version, cache_dir, options)
        return reference_of(read_model_metadata(directory))
    except (ArtifactError, OSError, ValueError, KeyError):
        return None


def run_drift(
    record: dict[str, Any],
    run_key: str,
    cache_dir: str,
    config: DriftConfig,
    options: StorageOptions | None,
) -> list[LineDrift]:
    """Drift of every scored line of a run about to be committed; writes the drift files.

    ``record`` is the run record before it is written (its ``files`` name the committed score
    files per line, ``models`` the pinned versions). Lines without a model are skipped.
    """
    output = record["config"]["output_uri"]
    results = []
    for line, version in sorted(record["models"].items()):
        if version is None:
            continue
        rows, totals = _read_rows(output, record["files"].get(line, []), options)
        reference = _reference_for(record["models_uri"], line, version, cache_dir, options)
        drift = compute_drift(
            rows, reference, config, line, record["run_date"], record["run_id"], version, totals
        )
        write_line_drift(output, run_key, drift, options)
        results.append(drift)
    return results


def drift_record(results: list[LineDrift], output: str, run_key: str) -> dict[str, Any]:
    """The ``drift`` section of the run record."""
    lines = {}
    for d in results:
        uri = drift_file_uri(output, d.run_date, d.product_line, run_key)
        lines[d.product_line] = {**d.to_dict(), "file": outputs.relative_to(output, uri)}
    return {"drifted": sorted(d.product_line for d in results if d.drifted), "lines": lines}


def drift_of_record(record: dict[str, Any]) -> tuple[LineDrift, ...]:
    """The typed drift results of a committed run record (empty for older records)."""
    lines = (record.get("drift") or {}).get("lines") or {}
    return tuple(LineDrift.from_dict(v) for _, v in sorted(lines.items()))


def remove_superseded(
    output: str, run_date: str, run_key: str, lines: list[str], options: StorageOptions | None
) -> None:
    """After a commit: other runs' drift files of the same date and lines go (readers ignore
    them anyway; removing them keeps a plain glob over drift/ free of duplicates)."""
    keep = f"drift-{run_key}.parquet"
    for line in lines:
        try:
            files = storage.list_files(
                outputs.partition_uri(output, KIND, run_date, line), options=options
            )
        except FileNotFoundError:
            continue
        for uri in files:
            if not uri.endswith("/" + keep):
                storage.remove_tree(uri, options)


def read_drift(output: str, options: StorageOptions | None = None) -> pd.DataFrame:
    """Drift rows of committed runs (the latest run per date and line), sorted by date, line."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for record in outputs.committed_runs(output, options):
        for line, row in ((record.get("drift") or {}).get("lines") or {}).items():
            latest[(record["run_date"], line)] = row
    rows = [
        {"run_date": date, "product_line": line, **{k: row.get(k) for k in DRIFT_SCHEMA.names}}
        for (date, line), row in sorted(latest.items())
    ]
    return pd.DataFrame(rows, columns=READ_COLUMNS)
