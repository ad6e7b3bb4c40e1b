"""Vectorised building blocks of the listing resolve (pipeline.listing.resolve), in Arrow.

Why a module of their own: resolving millions of rows with a Python tuple per row made the
driver's memory grow by kilobytes per listed image; these functions keep the data in Arrow
arrays and create Python objects only per chunk (hashing derived ids) or per problem row
(error messages), so the driver holds about 150 bytes per listed image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.row_errors import ListingReason


def checked(value: str | None, what: str) -> str | None:
    """None when ``value`` is a safe path component, else the reason it is not."""
    try:
        storage.safe_component(value if value is not None else "", what)
    except ValueError as exc:
        return str(exc)
    return None


#: Rows per chunk wherever a step needs Python objects (hashing ids, messages): the driver's
#: memory for those steps is bounded by a chunk, not by the listing.
_CHUNK_ROWS = 65_536
_SAFE_RE = r"^[A-Za-z0-9._-]{1,200}$"


def safe_mask(values: pa.Array) -> pa.Array:
    """Vectorised :func:`pipeline.storage.safe_component`: True where ``values`` is safe."""
    ok = pc.match_substring_regex(values, _SAFE_RE)
    ok = pc.and_(ok, pc.invert(pc.is_in(values, pa.array([".", ".."]))))
    return pc.fill_null(ok, False)


def derived_ids(uris: pa.Array, derive: Callable[[str], str]) -> pa.Array:
    """``derive`` (the listing's id rule) of every URI, a chunk of Python strings at a time."""
    parts = []
    for start in range(0, len(uris), _CHUNK_ROWS):
        chunk = uris.slice(start, _CHUNK_ROWS).to_pylist()
        parts.append(pa.array([derive(u) for u in chunk], pa.string()))
    return pa.concat_arrays(parts) if parts else pa.array([], pa.string())


def fingerprint(table: pa.Table, shard_size: int) -> str:
    """sha256 of the sorted (line, id, uri, captured_at) rows, streamed in chunks."""
    digest = hashlib.sha256()
    update_fingerprint(digest, table)
    return finish_fingerprint(digest, shard_size)


def finish_fingerprint(digest: hashlib._Hash, shard_size: int) -> str:
    """The fingerprint of the rows fed to ``digest`` so far (``digest`` itself is unchanged)."""
    done = digest.copy()
    done.update(f"shard_size={shard_size}".encode())
    return done.hexdigest()


def update_fingerprint(digest: hashlib._Hash, table: pa.Table) -> None:
    """Feed ``table``'s rows to ``digest``: rows fed in pieces hash as the whole table does."""
    captured = pc.fill_null(pc.cast(table.column("captured_at"), pa.string()), "")
    for start in range(0, table.num_rows, _CHUNK_ROWS):
        columns = [
            table.column(name).slice(start, _CHUNK_ROWS).combine_chunks()
            for name in ("product_line", "image_id", "image_uri")
        ]
        joined = pc.binary_join_element_wise(
            *columns, captured.slice(start, _CHUNK_ROWS).combine_chunks(), "", "\0"
        )
        if isinstance(joined, pa.ChunkedArray):
            joined = joined.combine_chunks()
        _, offsets, data = joined.buffers()
        bounds = np.frombuffer(offsets, dtype=np.int32)[joined.offset : joined.offset + 1]
        end = np.frombuffer(offsets, dtype=np.int32)[joined.offset + len(joined)]
        if data is not None:
            digest.update(memoryview(data)[int(bounds[0]) : int(end)])


def row_problems(
    uri: pa.Array, line: pa.Array, given: pa.Array, invalid_line: str
) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(product line to use, error_reason, message) per row; problems only where found.

    Priority as documented in docs/scoring.md: a bad product line, else an empty URI or a
    relative one the listing could not resolve (``..``: listing._resolve_uri leaves it as
    written), else an unsafe given id. Messages come from safe_component / resolve_relative
    themselves, for the few problem rows only.
    """
    n = len(uri)
    bad_line = pc.invert(safe_mask(line))
    filled = pc.fill_null(uri, "")
    empty = pc.equal(pc.utf8_trim_whitespace(filled), "")
    rooted = pc.or_(pc.match_substring(filled, "://"), pc.starts_with(filled, "/"))
    relative = pc.invert(pc.or_(pc.or_(empty, rooted), pc.starts_with(filled, "~")))
    bad_uri = pc.or_(empty, relative)
    has_id = pc.fill_null(pc.not_equal(given, ""), False)
    bad_id = pc.and_(has_id, pc.invert(safe_mask(given)))
    any_bad = pc.or_(pc.or_(bad_line, bad_uri), bad_id)
    rows = pc.indices_nonzero(any_bad).to_pylist()
    reasons = {}
    messages = {}
    lines_py = line.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    ids_py = given.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    bad_line_py = bad_line.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    bad_uri_py = bad_uri.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    uris_py = filled.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    for k, i in enumerate(rows):
        if bad_line_py[k]:
            reasons[i] = ListingReason.BAD_PRODUCT_LINE.value
            messages[i] = checked(lines_py[k], "product line")
        elif bad_uri_py[k]:
            reasons[i], messages[i] = ListingReason.BAD_URI.value, _uri_problem(uris_py[k])
        else:
            reasons[i] = ListingReason.BAD_IMAGE_ID.value
            messages[i] = checked(ids_py[k], "image id")
    reason_arr = sparse_strings(n, reasons)
    message_arr = sparse_strings(n, messages)
    fixed_line = pc.if_else(bad_line, pa.scalar(invalid_line), line)
    return fixed_line, reason_arr, message_arr


def _uri_problem(uri: str) -> str:
    """Why a listing's image_uri cannot be read: empty, or relative and unresolvable."""
    if not uri.strip():
        return "empty image_uri"
    try:
        storage.resolve_relative(uri, "/", "image_uri")
    except ValueError as exc:
        return str(exc)
    return f"relative image_uri {uri!r} was not resolved against the listing"


def sparse_strings(n: int, values: dict[int, str | None]) -> pa.Array:
    """A string array of ``n`` nulls with ``values`` at their indices."""
    if not values:
        return pa.nulls(n, pa.string())
    mask = np.zeros(n, dtype=bool)
    index = np.fromiter(values.keys(), dtype=np.int64, count=len(values))
    mask[index] = True
    ordered = [values[i] for i in sorted(values)]
    return pc.replace_with_mask(pa.nulls(n, pa.string()), pa.array(mask), pa.array(ordered))
