"""Scoring inputs: a listing file or an image prefix -> a sorted, sharded table of images.

The listing is what makes a run reproducible: the driver resolves it once into a deterministic,
sorted table (same input -> same rows, ids, shards and fingerprint), so a rerun or a resumed run
finds the shards it already committed under the same names. Problems with a row (an unsafe id, a
product line that cannot be a path component, a duplicate) are recorded on the row as an error
instead of dropping it, because every input must leave exactly one output row.

Two input forms:

* a listing file (``.parquet`` or ``.csv``) with columns ``image_uri``, ``product_line`` and
  optionally ``image_id`` and ``captured_at`` -- the production path, since listing millions of
  objects is slow;
* a prefix laid out as ``<prefix>/<product_line>/**/<file>`` -- the convenient path. Every file
  under it is an input (a non-image becomes an error row), except names starting with ``.``,
  which are in-flight uploads or temp files by convention.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import listing_arrow as la
from pipeline import storage
from pipeline.listing_rows import (  # noqa: F401 - re-exported: the listing's public names
    INVALID_LINE,
    LISTING_SCHEMA,
    PREPARED_SCHEMA,
    TIMESTAMP,
    Listing,
    build,
)
from pipeline.storage import StorageOptions

LISTING_SUFFIXES: tuple[str, ...] = (".parquet", ".csv")
REQUIRED_COLUMNS: tuple[str, ...] = ("image_uri", "product_line")
OPTIONAL_COLUMNS: tuple[str, ...] = ("image_id", "captured_at")
#: Length of derived image ids (hex sha1 of the URI): 80 bits, collision-free in practice.
DERIVED_ID_CHARS = 20
#: Input rows read, checked and sorted at a time: what bounds the driver's memory while it
#: resolves a listing (pipeline.listing_rows spills sorted chunks beyond the first).
CHUNK_ROWS = 262_144


class ListingError(ValueError):
    """The listing itself is unusable (missing columns, unreadable file): the job cannot run."""


def derive_image_id(image_uri: str) -> str:
    """A stable id for an image that has none: the hex sha1 of its URI, truncated.

    Hex is always a safe path component (it names the mask file), and the same URI gets the same
    id in every run, which is what makes reruns overwrite instead of duplicate.
    """
    return hashlib.sha1(image_uri.encode("utf-8")).hexdigest()[:DERIVED_ID_CHARS]


def is_listing_file(uri: str) -> bool:
    """True when ``uri`` names a listing file (by suffix) rather than an image prefix."""
    return uri.lower().rstrip("/").endswith(LISTING_SUFFIXES)


def _resolve_uri(entry: str, folder: str) -> str:
    """Relative entries in a listing are relative to the listing's own folder (the one rule,
    storage.resolve_relative); one that would climb out of it (``..``) stays as written, and
    becomes a ``bad_uri`` row (listing_arrow.row_problems) rather than failing the listing."""
    try:
        return storage.resolve_relative(entry, folder, "image_uri")
    except ValueError:
        return entry


def _parse_timestamps(column: pa.ChunkedArray, first_row: int = 0) -> pa.Array:
    """captured_at of any sensible type -> timestamp[us, UTC]; naive times are taken as UTC."""
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), TIMESTAMP)
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type):
        return pc.cast(column.combine_chunks(), TIMESTAMP)
    values = pd.Series(column.to_pylist(), dtype="object")
    parsed = pd.to_datetime(values, utc=True, format="ISO8601", errors="coerce")
    bad = values.notna() & (values.astype(str).str.strip() != "") & parsed.isna()
    if bad.any():
        rows = [int(i) for i in bad[bad].index[:5]]
        raise ListingError(
            f"captured_at: unparseable timestamps at rows {[first_row + r for r in rows]} "
            f"(e.g. {values[rows[0]]!r}); use ISO 8601"
        )
    return pa.array(parsed.dt.as_unit("us"), type=TIMESTAMP)


def _columns(table: pa.Table, uri: str, first_row: int) -> pa.Table:
    """A chunk of the listing file -> the four input columns, typed (ids stay strings)."""
    n = table.num_rows
    columns = {
        "image_uri": pc.cast(table.column("image_uri"), pa.string()).combine_chunks(),
        "product_line": pc.cast(table.column("product_line"), pa.string()),
        "image_id": (
            pc.cast(table.column("image_id"), pa.string())
            if "image_id" in table.column_names
            else pa.nulls(n, pa.string())
        ),
        "captured_at": (
            _parse_timestamps(table.column("captured_at"), first_row)
            if "captured_at" in table.column_names
            else pa.nulls(n, TIMESTAMP)
        ),
    }
    columns["image_uri"] = _resolve_relative(columns["image_uri"], uri)
    return pa.table(columns)


def _file_batches(uri: str, options: StorageOptions | None) -> Iterator[pa.RecordBatch]:
    """The listing file's record batches, streamed (a Parquet row group or CSV block each)."""
    fs, path = storage.pyarrow_fs(uri, options)
    if uri.lower().endswith(".parquet"):
        reader = pq.ParquetFile(fs.open_input_file(path))
        names = reader.schema_arrow.names
        _check_columns(uri, names)
        wanted = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in names]
        yield from reader.iter_batches(batch_size=CHUNK_ROWS, columns=wanted)
        return
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in REQUIRED_COLUMNS + OPTIONAL_COLUMNS},
        strings_can_be_null=True,
    )
    reader = pacsv.open_csv(
        fs.open_input_stream(path),
        read_options=pacsv.ReadOptions(block_size=16 * 2**20),
        convert_options=convert,
    )
    _check_columns(uri, reader.schema.names)
    yield from reader


def _check_columns(uri: str, names: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ListingError(f"listing {uri} lacks required columns {missing}; has {names}")


def _read_listing_file(
    uri: str, products: tuple[str, ...], options: StorageOptions | None
) -> Iterator[pa.Table]:
    """The listing file in chunks of about CHUNK_ROWS rows, typed, filtered to ``products``."""
    held: list[pa.RecordBatch] = []
    held_rows = first_row = 0
    batches = _file_batches(uri, options)
    while True:
        try:
            batch = next(batches, None)
        except FileNotFoundError as exc:
            raise ListingError(f"listing file not found: {uri}") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise ListingError(f"cannot read listing {uri}: {storage.redact(str(exc))}") from exc
        if batch is not None and batch.num_rows:
            held.append(batch)
            held_rows += batch.num_rows
        if held and (batch is None or held_rows >= CHUNK_ROWS):
            chunk = _columns(pa.Table.from_batches(held), uri, first_row)
            first_row += held_rows
            held, held_rows = [], 0
            if products:
                chunk = chunk.filter(pc.is_in(chunk.column("product_line"), pa.array(products)))
            yield chunk
        if batch is None:
            return


def _resolve_relative(uris: pa.Array, listing_uri: str) -> pa.Array:
    """:func:`_resolve_uri` for the entries that need it (relative ones) only."""
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    # An empty entry stays empty (a bad_uri row), rather than naming the listing's directory.
    relative = pc.fill_null(pc.and_(pc.invert(absolute), pc.not_equal(uris, "")), False)
    if not pc.any(relative).as_py():
        return uris
    folder = storage.folder_of(listing_uri)
    resolved = [_resolve_uri(u, folder) for u in uris.filter(relative).to_pylist()]
    return pc.replace_with_mask(uris, relative, pa.array(resolved, pa.string()))


def _list_prefix(
    prefix: str, products: tuple[str, ...], options: StorageOptions | None
) -> pa.Table:
    """``<prefix>/<line>/**/<file>`` -> rows; files directly under the prefix have no line."""
    base = storage.canonical_uri(prefix, options).rstrip("/")
    if not storage.exists(base, options):
        raise ListingError(f"input prefix not found or empty: {prefix}")
    if products:
        uris: list[str] = []
        for line in products:
            try:
                uris.extend(storage.list_files(f"{base}/{line}", options=options))
            except FileNotFoundError:
                continue  # a requested line with no images today: zero rows, not an error
    else:
        uris = storage.list_files(base, options=options)
    lines, kept = [], []
    for uri in uris:
        rel = uri[len(base) + 1 :] if uri.startswith(base + "/") else uri
        if posixpath.basename(rel).startswith("."):
            continue
        parts = rel.split("/")
        lines.append(parts[0] if len(parts) > 1 else None)
        kept.append(uri)
    n = len(kept)
    return pa.table(
        {
            "image_uri": pa.array(kept, pa.string()),
            "product_line": pa.array(lines, pa.string()),
            "image_id": pa.nulls(n, pa.string()),
            "captured_at": pa.nulls(n, TIMESTAMP),
        }
    )


def prepare(raw: pa.Table) -> pa.Table:
    """Raw rows -> PREPARED_SCHEMA: ids derived or validated, row problems recorded.

    Per row and vectorised in Arrow (Python objects only per chunk or per problem row), so it
    runs on one chunk of the input at a time.
    """
    raw = raw.combine_chunks()
    # Cast: a column of nulls only (e.g. no image_id at all) arrives as Arrow's null type.
    uri = pc.fill_null(pc.cast(raw.column("image_uri").combine_chunks(), pa.string()), "")
    line = pc.cast(raw.column("product_line").combine_chunks(), pa.string())
    given = pc.cast(raw.column("image_id").combine_chunks(), pa.string())
    line, reason, message = la.row_problems(uri, line, given, INVALID_LINE)
    missing_id = pc.fill_null(pc.equal(given, ""), True)
    if pc.any(missing_id).as_py():
        derived = la.derived_ids(uri.filter(missing_id), derive_image_id)
        image_id = pc.replace_with_mask(given, missing_id, derived)
    else:
        image_id = given
    return pa.table(
        {
            "product_line": line,
            "image_id": image_id,
            "image_uri": uri,
            "captured_at": pc.cast(raw.column("captured_at").combine_chunks(), TIMESTAMP),
            "reason": reason,
            "message": message,
        },
        schema=PREPARED_SCHEMA,
    )


def resolve(raw: pa.Table, shard_size: int, source: str) -> Listing:
    """Raw rows -> the deterministic listing: ids derived/validated, sorted, deduplicated, sharded.

    Rows are sorted by (product_line, image_id, image_uri) and each product line is cut into
    shards of ``shard_size`` rows, so the same input always yields the same shards. Whatever
    the size of ``raw``, the result equals what :func:`load_listing` builds from it in chunks.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    chunks = (prepare(raw.slice(i, CHUNK_ROWS)) for i in range(0, max(raw.num_rows, 1), CHUNK_ROWS))
    return build(chunks, shard_size, source)


def load_listing(
    input_uri: str,
    products: tuple[str, ...] = (),
    shard_size: int = 1000,
    options: StorageOptions | None = None,
) -> Listing:
    """Read a listing file or list a prefix, keep only ``products`` (all when empty), resolve.

    A listing file is read, checked and sorted CHUNK_ROWS rows at a time (pipeline.listing_rows
    spills sorted chunks to local disk and merges them), so the driver's memory does not grow
    with the listing. A prefix is listed whole first (one URI string per object).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if is_listing_file(input_uri):
        chunks, source = _read_listing_file(input_uri, products, options), "file"
    else:
        raw = _list_prefix(input_uri, products, options)
        chunks = (raw.slice(i, CHUNK_ROWS) for i in range(0, max(raw.num_rows, 1), CHUNK_ROWS))
        source = "prefix"
    return build((prepare(chunk) for chunk in chunks), shard_size, source)
