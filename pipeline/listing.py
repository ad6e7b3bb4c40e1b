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

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

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
        lines = set(self.table.column("product_line").to_pylist())
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
    uris = [None if u is None else _resolve_uri(u, uri) for u in columns["image_uri"].to_pylist()]
    columns["image_uri"] = pa.array(uris, pa.string())
    return pa.table(columns)


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


def _checked(value: str | None, what: str) -> str | None:
    """None when ``value`` is a safe path component, else the reason it is not."""
    try:
        storage.safe_component(value if value is not None else "", what)
    except ValueError as exc:
        return str(exc)
    return None


def resolve(raw: pa.Table, shard_size: int, source: str) -> Listing:
    """Raw rows -> the deterministic listing: ids derived/validated, sorted, deduplicated, sharded.

    Rows are sorted by (product_line, image_id, image_uri) and each product line is cut into
    shards of ``shard_size`` rows, so the same input always yields the same shards.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rows = []
    for uri, line, given, captured in zip(
        raw.column("image_uri").to_pylist(),
        raw.column("product_line").to_pylist(),
        raw.column("image_id").to_pylist(),
        raw.column("captured_at").to_pylist(),
        strict=True,
    ):
        reason = message = None
        uri = "" if uri is None else uri
        if not uri.strip():
            reason, message = "bad_uri", "empty image_uri"
        line_problem = _checked(line, "product line")
        if line_problem:
            reason, message = "bad_product_line", line_problem
            line = INVALID_LINE
        if given is None or given == "":
            image_id = derive_image_id(uri)
        else:
            image_id = given
            id_problem = _checked(given, "image id")
            if id_problem and reason is None:
                reason, message = "bad_image_id", id_problem
        rows.append((line, image_id, uri, captured, reason, message))
    rows.sort(key=lambda r: (r[0], r[1], r[2]))

    shards, statuses, reasons, errors = [], [], [], []
    digest = hashlib.sha256()
    previous: tuple[str, str] | None = None
    first_uri = ""
    ordinal = 0
    for line, image_id, uri, captured, reason, message in rows:
        key = (line, image_id)
        if previous is None or previous[0] != line:
            ordinal = 0
        if key == previous and reason is None:
            reason = "duplicate_image_id"
            message = f"image id {image_id!r} already used in this listing by {first_uri}"
        elif key != previous:
            first_uri = uri
        previous = key
        shards.append(ordinal // shard_size)
        ordinal += 1
        statuses.append("ok" if reason is None else "error")
        reasons.append(reason)
        errors.append(None if reason is None else f"{reason}: {message}")
        digest.update(f"{line}\0{image_id}\0{uri}\0{captured}\n".encode())
    digest.update(f"shard_size={shard_size}".encode())
    table = pa.table(
        {
            "image_id": pa.array([r[1] for r in rows], pa.string()),
            "image_uri": pa.array([r[2] for r in rows], pa.string()),
            "product_line": pa.array([r[0] for r in rows], pa.string()),
            "captured_at": pa.array([r[3] for r in rows], TIMESTAMP),
            "shard": pa.array(shards, pa.int32()),
            "status": pa.array(statuses, pa.string()),
            "error_reason": pa.array(reasons, pa.string()),
            "error": pa.array(errors, pa.string()),
        },
        schema=LISTING_SCHEMA,
    )
    return Listing(table=table, fingerprint=digest.hexdigest(), source=source)


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
