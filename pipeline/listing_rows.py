"""The resolved listing in bounded memory: sorted in pieces, finished in pieces, kept on disk.

Why a module of its own: a listing of ten million images does not fit the driver's memory
budget as one table (~125 bytes per row, plus the copies a sort makes). Here the listing is
sorted as an external merge sort: each chunk of the input is sorted and spilled to a local
Arrow IPC file (a "run"), the runs are merged a few thousand rows at a time, and the merged
rows are finished (duplicate ids, shards, status, fingerprint) by :class:`Finisher` with a
little state carried from one piece to the next. The result is written to one more IPC file
that the scoring job reads back a range at a time. A listing that fits one chunk (every test,
most nightly runs of a line) never touches the disk.

Pieces are finished exactly as one table would be: same rows, same order, same shards, same
fingerprint (tests/unit/test_listing.py compares the two).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from pipeline import listing_arrow as la
from pipeline.row_errors import ListingReason, RowStatus

#: Partition value for rows whose product line cannot be used as a path component.
INVALID_LINE = "_invalid"
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
#: Rows after the per-row checks, before sorting (pipeline.listing.prepare).
PREPARED_SCHEMA = pa.schema(
    [
        pa.field("product_line", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("captured_at", TIMESTAMP),
        pa.field("reason", pa.string()),
        pa.field("message", pa.string()),
    ]
)
SORT_KEYS = [(k, "ascending") for k in ("product_line", "image_id", "image_uri")]
#: Rows per batch of a spilled run, and so per run in one merge step: a merge step holds at
#: most (runs x MERGE_ROWS) rows.
MERGE_ROWS = 8192
#: Rows per batch of the resolved listing on disk (the unit the scoring job reads).
OUT_ROWS = 65_536

Shards = dict[tuple[str, int], tuple[int, int]]


class Finisher:
    """Prepared rows, fed in sorted order and in pieces -> LISTING_SCHEMA rows.

    Carries what crosses a piece boundary: the previous row's (line, id) and the URI that
    first used that id (duplicates), the ordinal within the current line (shards), the
    fingerprint's digest, and the shard index {(line, shard): (offset, length)}.
    """

    def __init__(self, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = shard_size
        self.digest = hashlib.sha256()
        self.rows = 0
        self.lines: set[str] = set()
        self.shards: Shards = {}
        self._line: str | None = None
        self._id: str | None = None
        self._first_uri: str | None = None
        self._ordinal = 0  # ordinal within self._line of the next row

    @property
    def fingerprint(self) -> str:
        return la.finish_fingerprint(self.digest, self.shard_size)

    def __call__(self, table: pa.Table) -> pa.Table:
        n = table.num_rows
        if n == 0:
            return LISTING_SCHEMA.empty_table()
        lines = table.column("product_line").combine_chunks()
        ids = table.column("image_id").combine_chunks()
        uris = table.column("image_uri").combine_chunks()
        reason = table.column("reason").combine_chunks()
        message = table.column("message").combine_chunks()
        encoded = pc.dictionary_encode(lines)
        codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
        names = encoded.dictionary.to_pylist()
        self.lines.update(names)

        new_line = np.ones(n, dtype=bool)
        same_id = np.zeros(n, dtype=bool)
        new_line[0] = names[codes[0]] != self._line
        same_id[0] = ids[0].as_py() == self._id
        if n > 1:
            new_line[1:] = codes[1:] != codes[:-1]
            same_id[1:] = np.asarray(
                pc.equal(ids.slice(1), ids.slice(0, n - 1)).to_numpy(zero_copy_only=False)
            )
        new_key = new_line | ~same_id
        positions = np.arange(n, dtype=np.int64)
        line_start = np.maximum.accumulate(np.where(new_line, positions, 0))
        ordinal = positions - line_start
        if not new_line[0]:  # the first rows continue the previous piece's line
            breaks = np.flatnonzero(new_line)
            ordinal[: breaks[0] if len(breaks) else n] += self._ordinal
        shards = (ordinal // self.shard_size).astype(np.int32)

        # Duplicates: a row whose (line, id) equals the previous row's and has no other problem.
        duplicate = ~new_key & np.asarray(pc.is_null(reason).to_numpy(zero_copy_only=False))
        key_start = np.maximum.accumulate(np.where(new_key, positions, 0))
        if duplicate.any():
            rows = np.flatnonzero(duplicate)
            firsts = uris.take(pa.array(key_start[rows])).to_pylist()
            if not new_key[0]:  # the first key run began in an earlier piece
                carried = rows < (np.flatnonzero(new_key)[0] if new_key.any() else n)
                firsts = [self._first_uri if c else f for c, f in zip(carried, firsts, strict=True)]
            dup_ids = ids.take(pa.array(rows)).to_pylist()
            texts = [
                f"image id {i!r} already used in this listing by {u}"
                for i, u in zip(dup_ids, firsts, strict=True)
            ]
            mask = pa.array(duplicate)
            reason = pc.replace_with_mask(
                reason, mask, pa.array([ListingReason.DUPLICATE_IMAGE_ID.value] * len(rows))
            )
            message = pc.replace_with_mask(message, mask, pa.array(texts, pa.string()))
        if new_key.any():
            self._first_uri = uris[int(key_start[-1])].as_py()
        self._line, self._id = names[codes[-1]], ids[n - 1].as_py()
        self._ordinal = int(ordinal[-1]) + 1
        self._index(names, codes, shards)

        status = pc.if_else(
            pc.is_null(reason), pa.scalar(RowStatus.OK.value), pa.scalar(RowStatus.ERROR.value)
        )
        resolved = pa.table(
            {
                "image_id": ids,
                "image_uri": uris,
                "product_line": lines,
                "captured_at": table.column("captured_at").combine_chunks(),
                "shard": pa.array(shards, pa.int32()),
                "status": status,
                "error_reason": reason,
                "error": pc.binary_join_element_wise(reason, message, ": "),
            },
            schema=LISTING_SCHEMA,
        )
        la.update_fingerprint(self.digest, resolved)
        self.rows += n
        return resolved

    def _index(self, names: list[str], codes: np.ndarray, shards: np.ndarray) -> None:
        """Add this piece's shard runs to the shard index (the first may continue one)."""
        n = len(codes)
        change = np.ones(n, dtype=bool)
        change[1:] = (codes[1:] != codes[:-1]) | (shards[1:] != shards[:-1])
        starts = np.flatnonzero(change)
        lengths = np.diff(np.append(starts, n))
        for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
            key = (names[codes[start]], int(shards[start]))
            offset, before = self.shards.get(key, (self.rows + start, 0))
            self.shards[key] = (offset, before + length)


# --------------------------------------------------------------------------------------------
# External merge sort
# --------------------------------------------------------------------------------------------


def _write(path: str, table: pa.Table, rows_per_batch: int) -> None:
    with ipc.new_file(pa.OSFile(path, "wb"), table.schema) as writer:
        writer.write_table(table, max_chunksize=rows_per_batch)


class _Run:
    """A sorted spilled chunk, read a batch at a time (heap reads, not a memory map, so what
    was read is freed once merged)."""

    def __init__(self, path: str) -> None:
        self.reader = ipc.open_file(pa.OSFile(path, "rb"))
        self.next = 0
        self.buffer = PREPARED_SCHEMA.empty_table()

    def fill(self) -> bool:
        while self.buffer.num_rows == 0 and self.next < self.reader.num_record_batches:
            self.buffer = pa.Table.from_batches([self.reader.get_batch(self.next)])
            self.next += 1
        return self.buffer.num_rows > 0

    def last_key(self) -> tuple[str, str, str]:
        i = self.buffer.num_rows - 1
        return tuple(self.buffer.column(k)[i].as_py() for k, _ in SORT_KEYS)  # type: ignore[return-value]

    def take_upto(self, bound: tuple[str, str, str]) -> pa.Table:
        """Remove and return the buffer's rows whose key is <= ``bound`` (a prefix: sorted)."""
        line, image_id, uri = (self.buffer.column(k) for k, _ in SORT_KEYS)
        at_most = pc.or_(
            pc.less(line, bound[0]),
            pc.and_(
                pc.equal(line, bound[0]),
                pc.or_(
                    pc.less(image_id, bound[1]),
                    pc.and_(pc.equal(image_id, bound[1]), pc.less_equal(uri, bound[2])),
                ),
            ),
        )
        count = int(pc.sum(at_most).as_py() or 0)
        head, self.buffer = self.buffer.slice(0, count), self.buffer.slice(count)
        return head


def _merge(paths: list[str]) -> Iterator[pa.Table]:
    """Rows of the sorted runs in global (line, id, uri) order, a merge step at a time.

    Each step takes, from every run, the rows up to the smallest of the runs' buffered last
    keys: no row still on disk can sort before them. Ties keep the runs' order (the input's).
    """
    runs = [r for r in (_Run(p) for p in paths) if r.fill()]
    while runs:
        bound = min(r.last_key() for r in runs)
        parts = [r.take_upto(bound) for r in runs]
        yield pa.concat_tables([p for p in parts if p.num_rows]).sort_by(SORT_KEYS)
        runs = [r for r in runs if r.fill()]


def sorted_pieces(chunks: Iterable[pa.Table], spill_dir: str) -> Iterator[pa.Table]:
    """Prepared chunks -> the same rows sorted by (line, id, uri), in bounded pieces.

    One chunk is sorted in memory; with more, every chunk becomes a run under ``spill_dir``.
    """
    held: pa.Table | None = None
    runs: list[str] = []
    for chunk in chunks:
        chunk = chunk.sort_by(SORT_KEYS) if chunk.num_rows else chunk
        if held is None and not runs:
            held = chunk
            continue
        for table in (held, chunk):
            if table is not None:
                runs.append(os.path.join(spill_dir, f"run-{len(runs):05d}.arrow"))
                _write(runs[-1], table, MERGE_ROWS)
        held = None
    if held is not None:
        yield held
        return
    try:
        yield from _merge(runs)
    finally:
        for path in runs:
            os.remove(path)


# --------------------------------------------------------------------------------------------
# The resolved listing
# --------------------------------------------------------------------------------------------


class Listing:
    """A resolved listing: its fingerprint, shard index and rows (in memory or on disk).

    ``rows(start, stop)`` reads a range back in pieces; ``table`` is the whole listing as one
    table, for small listings and tests. ``close()`` removes the spill directory (also done
    when the object is garbage collected).
    """

    def __init__(
        self,
        finisher: Finisher,
        source: str,
        pieces: list[pa.Table] | None = None,
        path: str | None = None,
        sizes: list[int] | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.fingerprint = finisher.fingerprint
        self.source = source  # "file" or "prefix"
        self.num_rows = finisher.rows
        self.shards: Shards = dict(sorted(finisher.shards.items(), key=lambda kv: kv[1][0]))
        self.product_lines = sorted(finisher.lines - {INVALID_LINE})  # valid lines only
        self._pieces = pieces
        self._path = path
        self._reader: ipc.RecordBatchFileReader | None = None
        if pieces is not None:
            sizes = [p.num_rows for p in pieces]
        elif path is not None:
            self._reader = ipc.open_file(pa.OSFile(path, "rb"))
        #: first row of each stored piece (batch), for range reads
        self._starts: list[int] = np.cumsum([0, *(sizes or [])])[:-1].tolist()
        self._finalizer = (
            weakref.finalize(self, shutil.rmtree, spill_dir, True) if spill_dir else None
        )

    @property
    def spilled(self) -> bool:
        return self._path is not None

    def _piece(self, i: int) -> pa.Table:
        if self._pieces is not None:
            return self._pieces[i]
        assert self._reader is not None
        return pa.Table.from_batches([self._reader.get_batch(i)])

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[pa.Table]:
        """Rows [start, stop) in listing order, one stored piece at a time."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < stop and i < len(self._starts):
            piece = self._piece(i)
            lo = start - self._starts[i]
            take = min(piece.num_rows - lo, stop - start)
            if take > 0:
                yield piece.slice(lo, take)
                start += take
            i += 1

    @property
    def table(self) -> pa.Table:
        parts = list(self.rows())
        return pa.concat_tables(parts) if parts else LISTING_SCHEMA.empty_table()

    def close(self) -> None:
        self._reader = None
        if self._finalizer is not None:
            self._finalizer()

    def __enter__(self) -> Listing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build(prepared: Iterable[pa.Table], shard_size: int, source: str) -> Listing:
    """Prepared chunks (any order) -> the resolved Listing, spilling only beyond one chunk."""
    finisher = Finisher(shard_size)
    spill_dir = tempfile.mkdtemp(prefix="dfr-listing-")
    try:
        out_path = os.path.join(spill_dir, "listing.arrow")
        writer: ipc.RecordBatchFileWriter | None = None
        pieces: list[pa.Table] = []
        sizes: list[int] = []
        for piece in sorted_pieces(prepared, spill_dir):
            resolved = finisher(piece)
            if writer is None and not pieces and _is_merged(spill_dir):
                writer = ipc.new_file(pa.OSFile(out_path, "wb"), LISTING_SCHEMA)
            if writer is None:
                pieces.append(resolved)
                continue
            for batch in resolved.to_batches(max_chunksize=OUT_ROWS):
                writer.write_batch(batch)
                sizes.append(batch.num_rows)
        if writer is not None:
            writer.close()
            return Listing(finisher, source, path=out_path, sizes=sizes, spill_dir=spill_dir)
    except BaseException:
        shutil.rmtree(spill_dir, ignore_errors=True)
        raise
    shutil.rmtree(spill_dir, ignore_errors=True)
    return Listing(finisher, source, pieces=pieces)


def _is_merged(spill_dir: str) -> bool:
    """True when the pieces come from spilled runs (the listing is larger than one chunk)."""
    return any(name.startswith("run-") for name in os.listdir(spill_dir))
