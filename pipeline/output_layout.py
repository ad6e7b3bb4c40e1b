"""Where everything a scoring run writes lives, and what its score files hold.

Layout under ``{output}``::

    scores/run_date=D/product_line=P/part-{shard:05d}-{run_key}.parquet   score rows
    masks/run_date=D/product_line=P/{image_id}.png                        0/255 masks
    masks/run_date=D/product_line=P/{image_id}.heatmap.png                optional heatmaps
    _shards/run_date=D/{run_key}/{P}/{shard:05d}.json                     shard commit markers
    runs/{run_id}.json                                                    run records (commit)
    _staging/run_date=D/                  temp files of in-flight local writes (never read)
    _leases/run_date=D/{generation}.json  the lease of the run in flight (pipeline.run_lease)

Every path is built here from validated parts (run dates, product lines, image ids), so no other
module spells a path a run writes. How the files become visible is :mod:`pipeline.run_commit`;
how readers get at them is :mod:`pipeline.outputs`.
"""

from __future__ import annotations

import datetime as dt
import functools
import io
import logging
import re

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline import storage
from pipeline.row_errors import ListingReason, ReadReason
from pipeline.storage import StorageOptions

logger = logging.getLogger(__name__)

MASK_MODES: tuple[str, ...] = ("anomalous", "all", "none")
TIMESTAMP = pa.timestamp("us", tz="UTC")
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")

#: Error reasons (``error_reason``), by the step that sets them; docs/scoring.md explains each.
LISTING_REASONS: tuple[str, ...] = tuple(reason.value for reason in ListingReason)
READ_REASONS: tuple[str, ...] = tuple(reason.value for reason in ReadReason)
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


def output_root(output: str) -> str:
    """``output`` without a trailing slash (a bare root such as ``/`` is kept)."""
    return output.rstrip("/") or output


def partition_uri(output: str, kind: str, run_date: str, product_line: str) -> str:
    """``{output}/{kind}/run_date=D/product_line=P`` with D and P validated as path parts."""
    storage.safe_component(kind, "output kind")
    check_run_date(run_date)
    storage.safe_component(product_line, "product line")
    return f"{output_root(output)}/{kind}/run_date={run_date}/product_line={product_line}"


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


def shard_markers_root(output: str, run_date: str) -> str:
    return f"{output_root(output)}/_shards/run_date={check_run_date(run_date)}"


def shard_marker_uri(
    output: str, run_date: str, run_key: str, product_line: str, shard: int
) -> str:
    return storage.join_uri(
        shard_markers_root(output, run_date), run_key, product_line, f"{shard:05d}.json"
    )


def staging_uri(output: str, run_date: str) -> str:
    """Where the temp files of a date's local atomic writes live (masks, heatmaps, shard files,
    markers, run records). Readers never look here; the run holding the date's lease empties it
    when it starts and when it ends, so a process killed mid-write leaves debris only here, and
    only until the next run of the same date."""
    return f"{output_root(output)}/_staging/run_date={check_run_date(run_date)}"


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
    storage.remove_empty_dir(f"{output_root(output)}/_staging")


def run_record_uri(output: str, run_id: str) -> str:
    return storage.join_uri(output_root(output), "runs", f"{run_id}.json")


def relative_to(output: str, uri: str) -> str:
    """``uri`` relative to the output root, so run records survive moving the output."""
    root = output_root(output) + "/"
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
