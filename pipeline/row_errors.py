"""The one writer of a row's error columns: ``status``, ``error_reason``, ``error``.

Every input image becomes exactly one output row, and a row can fail at several steps (a
listing problem, a model that cannot score, a read, a decode, the scoring itself). Each step
marks its failures here, so every error row looks the same: status "error", the reason code,
and "reason: message" (messages redacted by the caller, which knows where they came from).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

ERROR_COLUMNS = ("status", "error_reason", "error")
ERROR = "error"


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
