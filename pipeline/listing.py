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
import os
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline import listing_arrow as la
from pipeline import storage
from pipeline.image_sets import canonical_uri
from pipeline.storage import StorageOptions

LISTING_SUFFIXES: tuple[str, ...] = (".parquet", ".csv")
REQUIRED_COLUMNS: tuple[str, ...] = ("image_uri", "product_line")
OPTIONAL_COLUMNS: tuple[str, ...] = ("image_id", "captured_at")
#: Partition value for rows whose product line cannot be used as a path component.
INVALID_LINE = "_invalid"
#: Length of derived image ids (hex sha1 of the URI): 80 bits, collision-free in practice.
DERIVED_ID_CHARS = 20

TIMESTAMP = pa.timestamp("us", tz="UTC")

#: The resolved listing: one row per input, sorted by (product_line, image_id, image_uri).
#: ``status``/``error_reason``/``error`` carry problems found while resolving the listing.
LISTING_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("product_line", pa.string(), nullable=False),
        pa.field("captured_at", TIMESTAMP),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error_reason", pa.string()),
        pa.field("error", pa.string()),
    ]
)


class ListingError(ValueError):
    """The listing itself is unusable (missing columns, unreadable file): the job cannot run."""


@dataclass(frozen=True)
class Listing:
    """A resolved listing and the fingerprint that names its content."""

    table: pa.Table  # LISTING_SCHEMA
    fingerprint: str  # sha256 of the sorted rows; changes when any input changes
    source: str  # "file" or "prefix"

    @property
    def product_lines(self) -> list[str]:
        """Distinct product lines (valid ones only), sorted."""
        lines = set(pc.unique(self.table.column("product_line")).to_pylist())
        return sorted(lines - {INVALID_LINE})


def derive_image_id(image_uri: str) -> str:
    """A stable id for an image that has none: the hex sha1 of its URI, truncated.

    Hex is always a safe path component (it names the mask file), and the same URI gets the same
    id in every run, which is what makes reruns overwrite instead of duplicate.
    """
    return hashlib.sha1(image_uri.encode("utf-8")).hexdigest()[:DERIVED_ID_CHARS]


def is_listing_file(uri: str) -> bool:
    """True when ``uri`` names a listing file (by suffix) rather than an image prefix."""
    return uri.lower().rstrip("/").endswith(LISTING_SUFFIXES)


def _resolve_uri(entry: str, listing_uri: str) -> str:
    """Relative entries in a listing are relative to the listing's own directory."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    if "://" in listing_uri:
        scheme, rest = listing_uri.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join(posixpath.dirname(rest), entry))
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(listing_uri)), entry))


def _parse_timestamps(column: pa.ChunkedArray) -> pa.Array:
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
            f"captured_at: unparseable timestamps at rows {rows} "
            f"(e.g. {values[rows[0]]!r}); use ISO 8601"
        )
    return pa.array(parsed.dt.as_unit("us"), type=TIMESTAMP)


def _read_listing_file(uri: str, options: StorageOptions | None) -> pa.Table:
    """Read the listing file's columns as given (strings for ids, so '0012' stays '0012')."""
    try:
        if uri.lower().endswith(".parquet"):
            fs, path = storage.pyarrow_fs(uri, options)
            table = pq.read_table(path, filesystem=fs)
        else:
            data = storage.read_bytes(uri, options)
            names = set(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
            convert = pacsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=True,
            )
            table = pacsv.read_csv(pa.BufferReader(data), convert_options=convert)
    except FileNotFoundError as exc:
        raise ListingError(f"listing file not found: {uri}") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise ListingError(f"cannot read listing {uri}: {storage.redact(str(exc))}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ListingError(
            f"listing {uri} lacks required columns {missing}; has {table.column_names}"
        )
    n = table.num_rows
    columns = {
        "image_uri": pc.cast(table.column("image_uri"), pa.string()),
        "product_line": pc.cast(table.column("product_line"), pa.string()),
        "image_id": (
            pc.cast(table.column("image_id"), pa.string())
            if "image_id" in table.column_names
            else pa.nulls(n, pa.string())
        ),
        "captured_at": (
            _parse_timestamps(table.column("captured_at"))
            if "captured_at" in table.column_names
            else pa.nulls(n, TIMESTAMP)
        ),
    }
    columns["image_uri"] = _resolve_relative(columns["image_uri"].combine_chunks(), uri)
    return pa.table(columns)


def _resolve_relative(uris: pa.Array, listing_uri: str) -> pa.Array:
    """:func:`_resolve_uri` for the entries that need it (relative ones) only."""
    absolute = pc.or_(pc.match_substring(uris, "://"), pc.starts_with(uris, "/"))
    relative = pc.fill_null(pc.invert(absolute), False)
    if not pc.any(relative).as_py():
        return uris
    resolved = [_resolve_uri(u, listing_uri) for u in uris.filter(relative).to_pylist()]
    return pc.replace_with_mask(uris, relative, pa.array(resolved, pa.string()))


def _list_prefix(
    prefix: str, products: tuple[str, ...], options: StorageOptions | None
) -> pa.Table:
    """``<prefix>/<line>/**/<file>`` -> rows; files directly under the prefix have no line."""
    base = canonical_uri(prefix, options).rstrip("/")
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


def resolve(raw: pa.Table, shard_size: int, source: str) -> Listing:
    """Raw rows -> the deterministic listing: ids derived/validated, sorted, deduplicated, sharded.

    Rows are sorted by (product_line, image_id, image_uri) and each product line is cut into
    shards of ``shard_size`` rows, so the same input always yields the same shards. Vectorised
    in Arrow (Python objects only per chunk or per problem row), so the driver holds about
    150 bytes per listed image rather than a Python tuple per row.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
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
    table = pa.table(
        {
            "product_line": line,
            "image_id": image_id,
            "image_uri": uri,
            "captured_at": pc.cast(raw.column("captured_at").combine_chunks(), TIMESTAMP),
            "reason": reason,
            "message": message,
        }
    )
    del raw, uri, line, given, image_id, reason, message
    order = pc.sort_indices(
        table,
        sort_keys=[
            ("product_line", "ascending"),
            ("image_id", "ascending"),
            ("image_uri", "ascending"),
        ],
    )
    table = table.take(order)
    del order
    n = table.num_rows
    lines = table.column("product_line").combine_chunks()
    ids = table.column("image_id").combine_chunks()
    reason = table.column("reason").combine_chunks()
    message = table.column("message").combine_chunks()

    # Ordinal within the line (lines are contiguous after the sort) -> shard.
    codes = np.asarray(pc.dictionary_encode(lines).indices.to_numpy(zero_copy_only=False))
    new_line = np.ones(n, dtype=bool)
    new_key = np.ones(n, dtype=bool)
    if n > 1:
        new_line[1:] = codes[1:] != codes[:-1]
        same_id = np.asarray(
            pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        )
        new_key[1:] = new_line[1:] | ~same_id
    positions = np.arange(n, dtype=np.int64)
    line_start = np.maximum.accumulate(np.where(new_line, positions, 0)) if n else positions
    shards = ((positions - line_start) // shard_size).astype(np.int32)

    # Duplicates: a row whose (line, id) equals the previous row's and has no other problem.
    no_reason = np.asarray(pc.is_null(reason).to_numpy(zero_copy_only=False)) if n else new_key
    duplicate = ~new_key & no_reason
    if duplicate.any():
        key_start = np.maximum.accumulate(np.where(new_key, positions, 0))
        rows = np.flatnonzero(duplicate)
        firsts = table.column("image_uri").take(pa.array(key_start[rows])).to_pylist()
        dup_ids = ids.take(pa.array(rows)).to_pylist()
        texts = [
            f"image id {i!r} already used in this listing by {u}"
            for i, u in zip(dup_ids, firsts, strict=True)
        ]
        mask = pa.array(duplicate)
        reason = pc.replace_with_mask(reason, mask, pa.array(["duplicate_image_id"] * len(rows)))
        message = pc.replace_with_mask(message, mask, pa.array(texts, pa.string()))
    status = pc.if_else(pc.is_null(reason), pa.scalar("ok"), pa.scalar("error"))
    error = pc.binary_join_element_wise(reason, message, ": ")
    resolved = pa.table(
        {
            "image_id": ids,
            "image_uri": table.column("image_uri"),
            "product_line": lines,
            "captured_at": table.column("captured_at"),
            "shard": pa.array(shards, pa.int32()),
            "status": status,
            "error_reason": reason,
            "error": error,
        },
        schema=LISTING_SCHEMA,
    )
    return Listing(table=resolved, fingerprint=la.fingerprint(resolved, shard_size), source=source)


def load_listing(
    input_uri: str,
    products: tuple[str, ...] = (),
    shard_size: int = 1000,
    options: StorageOptions | None = None,
) -> Listing:
    """Read a listing file or list a prefix, keep only ``products`` (all when empty), resolve."""
    if is_listing_file(input_uri):
        raw, source = _read_listing_file(input_uri, options), "file"
        if products:
            raw = raw.filter(pc.is_in(raw.column("product_line"), pa.array(products)))
    else:
        raw, source = _list_prefix(input_uri, products, options), "prefix"
    return resolve(raw, shard_size, source)
