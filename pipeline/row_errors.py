"""The one writer of a row's error columns: ``status``, ``error_reason``, ``error``.

Every input image becomes exactly one output row, and a row can fail at several steps (a
listing problem, a model that cannot score, a read, a decode, the scoring itself). Each step
marks its failures here, so every error row looks the same: status "error", the reason code,
and "reason: message" (messages redacted by the caller, which knows where they came from).
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa
import pyarrow.compute as pc

ERROR_COLUMNS = ("status", "error_reason", "error")


class RowStatus(StrEnum):
    """A score row's ``status``."""

    OK = "ok"
    ERROR = "error"


class ListingReason(StrEnum):
    """``error_reason`` of rows that fail before any byte is read (listing, model lookup)."""

    BAD_URI = "bad_uri"
    BAD_PRODUCT_LINE = "bad_product_line"
    BAD_IMAGE_ID = "bad_image_id"
    DUPLICATE_IMAGE_ID = "duplicate_image_id"
    NO_MODEL = "no_model"
    MODEL_ERROR = "model_error"


class ReadReason(StrEnum):
    """``error_reason`` of rows whose bytes could not be read (the decoder's own reasons are
    dfr_core.decode.DecodeReason, the input geometry's dfr_core.geometry.GeometryReason)."""

    NOT_FOUND = "not_found"
    ACCESS_DENIED = "access_denied"
    READ_ERROR = "read_error"
    FILE_TOO_LARGE = "file_too_large"


ERROR = RowStatus.ERROR.value


def mark_errors(
    table: pa.Table,
    hit: pa.Array | pa.ChunkedArray,
    reason: pa.Array | pa.Scalar,
    message: pa.Array | pa.Scalar,
) -> pa.Table:
    """Rows where ``hit`` is true become error rows with ``reason`` and ``message`` (arrays
    aligned with the rows, or one scalar for all). Vectorised: no Python object per row, and
    each column keeps its schema field (nullability and metadata)."""
    status, reasons, errors = (table.column(name) for name in ERROR_COLUMNS)
    columns = (
        pc.if_else(hit, pa.scalar(ERROR), status),
        pc.if_else(hit, reason, reasons),
        pc.if_else(hit, pc.binary_join_element_wise(reason, message, ": "), errors),
    )
    for name, values in zip(ERROR_COLUMNS, columns, strict=True):
        index = table.schema.get_field_index(name)
        table = table.set_column(index, table.schema.field(name), values)
    return table
