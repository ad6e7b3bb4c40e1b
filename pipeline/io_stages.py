"""The torch-free stages of the scoring job: read bytes, decode + the model's geometry.

They run in plain Ray Data tasks, never in the scoring actors (see score_job's resource
sizing), and import neither torch nor anything that does: importing the CUDA torch build costs
about 1 GB of RSS per worker (`tests/unit/test_io_stages.py` checks this in a subprocess).
The model inputs come from `dfr_core.geometry.prepare_image` (numpy): the image resized to the
model's input size, or cut into the tiles of a tiled model, the same pixels as training saw.

Every stage takes and returns a pyarrow table with the listing's columns (see score_stages); a
row already in error passes through untouched and a failure of one row becomes that row's error.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dfr_core.config import ModelConfig
from dfr_core.decode import DecodeError, DecodeReason, decode_image, header_size
from dfr_core.geometry import GeometryError, TilePlan, plan_tiles, prepare_image
from pipeline import storage
from pipeline.input_stats import STAT_NAMES, tiles_stats
from pipeline.listing_arrow import sparse_strings
from pipeline.row_errors import ListingReason, ReadReason, RowStatus, mark_errors
from pipeline.storage import StorageOptions

#: Columns added by the stages, in order of appearance.
READ_COLUMNS = pa.schema([pa.field("data", pa.large_binary())])
#: An ok row carries its image's model inputs and their dfr_core.geometry.TilePlan: an untiled
#: model has one tile (the image resized to its input size, as before tiling existed).
DECODE_COLUMNS = pa.schema(
    [
        pa.field("width", pa.int32()),  # the original image (after EXIF orientation)
        pa.field("height", pa.int32()),
        pa.field("pixels", pa.large_binary()),  # (tiles, tile_height, tile_width, 3) uint8, C order
        pa.field("tiles", pa.int32()),
        pa.field("tile_height", pa.int32()),  # the model input's size
        pa.field("tile_width", pa.int32()),
        pa.field("map_height", pa.int32()),  # the stitched anomaly map's size
        pa.field("map_width", pa.int32()),
        pa.field("origins", pa.list_(pa.int32())),  # top0, left0, top1, left1, ... in the map
        *(pa.field(name, pa.float64()) for name in STAT_NAMES),
    ]
)
_PLAN_NAMES = (
    "tiles", "tile_height", "tile_width", "map_height", "map_width", "origins", "height", "width",
)  # fmt: skip


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

    pyarrow's filesystems (C++, GIL released) and a plain input stream. On S3 that is a HEAD
    (Arrow learns the size; the listing has none) and one GET per object. fsspec's ``cat_file``
    makes only the GET, but costs more client CPU: 1.8 against 1.0 ms an object, ad hoc against
    the moto server. Client CPU is the job's; request charges are small. So we keep pyarrow.
    """
    try:
        fs, path = storage.pyarrow_fs(uri, config.options)
    except ValueError as exc:
        return RowError(ListingReason.BAD_URI, str(exc))
    try:
        with fs.open_input_stream(path) as stream:
            data = _read_capped(stream, config.max_bytes + 1)
    except FileNotFoundError as exc:
        return RowError(ReadReason.NOT_FOUND, str(exc) or uri)
    except PermissionError as exc:
        return RowError(ReadReason.ACCESS_DENIED, str(exc) or uri)
    except Exception as exc:  # any storage failure of this one object is this row's error
        text = f"{type(exc).__name__}: {exc}"
        denied = "ACCESS_DENIED" in text or "AccessDenied" in text
        return RowError(ReadReason.ACCESS_DENIED if denied else ReadReason.READ_ERROR, text)
    if len(data) > config.max_bytes:
        return RowError(ReadReason.FILE_TOO_LARGE, f"larger than the {config.max_bytes} byte cap")
    return data


def read_batch(batch: pa.Table, config: ReadConfig) -> pa.Table:
    """Add ``data`` (the object's bytes, no decoding); read failures become error rows."""
    uris = batch.column("image_uri").to_pylist()
    status = batch.column("status").to_pylist()
    todo = [i for i, s in enumerate(status) if s == RowStatus.OK]
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
# Stage 2: decode + RGB + the model's geometry (resize, or tiles) (CPU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeConfig:
    """Per product line, its model's geometry (a ModelConfig: image_size, tile, ...).

    An int stands for a square untiled model of that input size (the geometry of every model
    written before issue 12), so a caller that only knows a size need not build a ModelConfig.
    """

    geometry: Mapping[str, ModelConfig | int]
    max_pixels: int

    def __post_init__(self) -> None:
        normalised = {
            line: g if isinstance(g, ModelConfig) else ModelConfig(image_size=int(g))
            for line, g in self.geometry.items()
        }
        object.__setattr__(self, "geometry", normalised)


class Prepared(NamedTuple):
    """One image as the scoring actor takes it: its model inputs and where they sit."""

    tiles: np.ndarray  # (N, th, tw, 3) uint8
    plan: TilePlan


def _refuse_by_header(data: bytes, geometry: ModelConfig, max_pixels: int) -> None:
    """Raise GeometryError from the header's size alone, before any pixel is decoded, so an
    image beyond ``max_tiles`` never allocates its pixels or tiles (the refusal does not depend
    on EXIF orientation, which the header size lacks: a transposed image needs as many tiles).
    An image over the pixel cap (or a header that cannot tell its size) is left to
    decode_image, which names that. Untiled models take any size (one resize): no header read,
    so the common case opens each file once."""
    if geometry.tile is None:
        return
    hw = header_size(data)
    if hw is not None and hw[0] * hw[1] <= max_pixels:
        plan_tiles(geometry, *hw)


def prepare_one(data: bytes, geometry: ModelConfig, max_pixels: int) -> Prepared:
    """Bytes -> the model inputs of one image (dfr_core.geometry.prepare_image, THE
    preprocessing of training and calibration). Raises DecodeError or GeometryError."""
    _refuse_by_header(data, geometry, max_pixels)
    array = decode_image(data, max_pixels)
    try:
        tiles, plan = prepare_image(geometry, array)
    except GeometryError:
        raise
    except ValueError as exc:  # decoded, but not an image layout the model can take
        raise DecodeError(DecodeReason.UNSUPPORTED_FORMAT, str(exc)) from exc
    return Prepared(tiles, plan)


def _failure(exc: DecodeError | GeometryError) -> RowError:
    if isinstance(exc, DecodeError):
        return RowError(str(exc.reason), exc.message)
    return RowError(str(exc.reason), str(exc))


def decode_batch(batch: pa.Table, config: DecodeConfig) -> pa.Table:
    """Replace ``data`` by the original size, the model inputs (tiles) and their plan."""
    data = batch.column("data").to_pylist()
    lines = batch.column("product_line").to_pylist()
    status = batch.column("status").to_pylist()
    columns: dict[str, list[Any]] = {f.name: [None] * batch.num_rows for f in DECODE_COLUMNS}
    failures: dict[int, RowError] = {}
    for i in range(batch.num_rows):
        if status[i] != RowStatus.OK:
            continue
        try:
            prepared = prepare_one(data[i], config.geometry[lines[i]], config.max_pixels)
        except (DecodeError, GeometryError) as exc:
            failures[i] = _failure(exc)
            continue
        data[i] = None  # the encoded bytes are no longer needed: free them as we go
        for name, value in plan_columns(prepared).items():
            columns[name][i] = value
    batch = _set_errors(batch.drop_columns(["data"]), failures)
    for field in DECODE_COLUMNS:
        batch = batch.append_column(field, pa.array(columns[field.name], field.type))
    return batch


def plan_columns(prepared: Prepared) -> dict[str, Any]:
    """One ok row's decode columns (see DECODE_COLUMNS)."""
    tiles, plan = prepared
    stats = tiles_stats(tiles)
    return {
        "width": plan.width,
        "height": plan.height,
        "pixels": tiles.tobytes(),
        "tiles": plan.n_tiles,
        "tile_height": plan.tile_hw[0],
        "tile_width": plan.tile_hw[1],
        "map_height": plan.map_hw[0],
        "map_width": plan.map_hw[1],
        "origins": plan.origins.reshape(-1).tolist(),
        **dict(zip(STAT_NAMES, stats, strict=True)),
    }


def prepared_rows(batch: pa.Table) -> dict[int, Prepared]:
    """The ok rows' tiles and plans, rebuilt from their decode columns (the scoring actor's side
    of plan_columns; the tiles are read-only views of the batch's buffers, not copies)."""
    status = batch.column("status").to_pylist()
    col = {name: batch.column(name).to_pylist() for name in _PLAN_NAMES}
    pixels = batch.column("pixels")
    out: dict[int, Prepared] = {}
    for i, state in enumerate(status):
        if state != RowStatus.OK:
            continue
        n, th, tw = col["tiles"][i], col["tile_height"][i], col["tile_width"][i]
        tiles = np.frombuffer(pixels[i].as_buffer(), np.uint8).reshape(n, th, tw, 3)
        plan = TilePlan(
            col["height"][i],
            col["width"][i],
            (col["map_height"][i], col["map_width"][i]),
            np.asarray(col["origins"][i], dtype=np.int64).reshape(n, 2),
            (th, tw),
        )
        out[i] = Prepared(tiles, plan)
    return out
