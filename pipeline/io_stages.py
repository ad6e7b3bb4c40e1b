"""The torch-free stages of the scoring job: read bytes, decode + resize.

They run in plain Ray Data tasks, never in the scoring actors (see score_job's resource
sizing), and import neither torch nor anything that does: importing the CUDA torch build costs
about 1 GB of RSS per worker (`tests/unit/test_io_stages.py` checks this in a subprocess).
Resizing is `dfr_core.resize` (numpy), the same pixels as the model's own preprocessing.

Every stage takes and returns a pyarrow table with the listing's columns (see score_stages); a
row already in error passes through untouched and a failure of one row becomes that row's error.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc

from dfr_core.decode import DecodeError, decode_resized
from pipeline import storage
from pipeline.input_stats import STAT_NAMES, image_stats
from pipeline.listing_arrow import sparse_strings
from pipeline.row_errors import mark_errors
from pipeline.storage import StorageOptions

#: Columns added by the stages, in order of appearance.
READ_COLUMNS = pa.schema([pa.field("data", pa.large_binary())])
DECODE_COLUMNS = pa.schema(
    [
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("pixels", pa.large_binary()),  # resized (S, S, 3) uint8, C order
        pa.field("size", pa.int32()),
        *(pa.field(name, pa.float64()) for name in STAT_NAMES),
    ]
)


class RowError(NamedTuple):
    reason: str
    message: str


def _set_errors(batch: pa.Table, failures: dict[int, RowError]) -> pa.Table:
    """Mark rows ``i`` in ``failures`` as errors (status/error_reason/error columns)."""
    if not failures:
        return batch
    reasons = sparse_strings(batch.num_rows, {i: f.reason for i, f in failures.items()})
    messages = {i: storage.redact(f.message) for i, f in failures.items()}
    return mark_errors(
        batch, pc.is_valid(reasons), reasons, sparse_strings(batch.num_rows, messages)
    )


# --------------------------------------------------------------------------------------------
# Stage 1: read bytes (I/O bound: threads)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReadConfig:
    options: StorageOptions | None
    threads: int
    max_bytes: int


def _read_capped(stream: Any, cap: int) -> bytes:
    """Read to EOF, but never more than ``cap`` bytes (a short read is not EOF on every fs)."""
    chunks, total = [], 0
    while total < cap:
        chunk = stream.read(min(cap - total, 1 << 24))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _read_one(uri: str, config: ReadConfig) -> bytes | RowError:
    """One object's bytes, capped at max_bytes + 1 so a huge file is refused without a full read.

    pyarrow's filesystems (C++, GIL released) and a plain input stream: one GET per S3 object,
    where an fsspec open would add a HEAD.
    """
    try:
        fs, path = storage.pyarrow_fs(uri, config.options)
    except ValueError as exc:
        return RowError("bad_uri", str(exc))
    try:
        with fs.open_input_stream(path) as stream:
            data = _read_capped(stream, config.max_bytes + 1)
    except FileNotFoundError as exc:
        return RowError("not_found", str(exc) or uri)
    except PermissionError as exc:
        return RowError("access_denied", str(exc) or uri)
    except Exception as exc:  # any storage failure of this one object is this row's error
        text = f"{type(exc).__name__}: {exc}"
        denied = "ACCESS_DENIED" in text or "AccessDenied" in text
        return RowError("access_denied" if denied else "read_error", text)
    if len(data) > config.max_bytes:
        return RowError("file_too_large", f"larger than the {config.max_bytes} byte cap")
    return data


def read_batch(batch: pa.Table, config: ReadConfig) -> pa.Table:
    """Add ``data`` (the object's bytes, no decoding); read failures become error rows."""
    uris = batch.column("image_uri").to_pylist()
    status = batch.column("status").to_pylist()
    todo = [i for i, s in enumerate(status) if s == "ok"]
    data: list[bytes | None] = [None] * batch.num_rows
    failures: dict[int, RowError] = {}
    with ThreadPoolExecutor(max_workers=max(1, min(config.threads, len(todo)))) as pool:
        results = pool.map(lambda i: _read_one(uris[i], config), todo)
        for i, result in zip(todo, results, strict=True):
            if isinstance(result, RowError):
                failures[i] = result
            else:
                data[i] = result
    batch = _set_errors(batch, failures)
    return batch.append_column(READ_COLUMNS.field("data"), pa.array(data, pa.large_binary()))


# --------------------------------------------------------------------------------------------
# Stage 2: decode + RGB + resize (CPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    image_sizes: dict[str, int]  # product line -> its model's input size
    max_pixels: int


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Replace ``data`` by the original size and the resized RGB pixels of each image."""
    data = batch.column("data").to_pylist()
    lines = batch.column("product_line").to_pylist()
    status = batch.column("status").to_pylist()
    n = batch.num_rows
    widths: list[int | None] = [None] * n
    heights: list[int | None] = [None] * n
    pixels: list[bytes | None] = [None] * n
    sizes: list[int | None] = [None] * n
    stats: list[tuple[float, ...] | None] = [None] * n
    failures: dict[int, RowError] = {}
    for i in range(n):
        if status[i] != "ok":
            continue
        size = config.image_sizes[lines[i]]
        try:
            decoded = decode_resized(data[i], size, config.max_pixels)
        except DecodeError as exc:
            failures[i] = RowError(exc.reason, exc.message)
            continue
        heights[i], widths[i] = decoded.height, decoded.width
        pixels[i], sizes[i] = decoded.pixels.tobytes(), size
        stats[i] = image_stats(decoded.pixels)
    batch = _set_errors(batch.drop_columns(["data"]), failures)
    columns = {"width": widths, "height": heights, "pixels": pixels, "size": sizes}
    for k, name in enumerate(STAT_NAMES):
        columns[name] = [None if s is None else s[k] for s in stats]
    for field in DECODE_COLUMNS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch
