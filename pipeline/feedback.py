"""QA feedback: reviewers' verdicts on scored images, fed back into training.

A CSV or Parquet table with columns ``image_uri``, ``product_line``, ``label`` (``normal`` or
``defect``), and optional ``mask_uri``, ``reviewer``, ``reviewed_at`` (ISO 8601). Validated as a
whole before anything trains, like the manifest: every problem is reported at once with its
line (the CSV line; for Parquet the row number counting the header as line 1) and column, and
one bad row means nothing is trained or promoted.

What training does with it (``dfr-pipeline train --feedback URI``): confirmed normals (false
positives of the current model) join the line's training images; confirmed defects join its
evaluation set (with their mask when given). Counts and the file's sha256 go into model.json.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline import storage
from pipeline.manifest import Problem
from pipeline.storage import StorageOptions

REQUIRED_COLUMNS: tuple[str, ...] = ("image_uri", "product_line", "label")
OPTIONAL_COLUMNS: tuple[str, ...] = ("mask_uri", "reviewer", "reviewed_at")
COLUMNS = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
NORMAL, DEFECT = "normal", "defect"
LABELS: tuple[str, ...] = (NORMAL, DEFECT)
_CHECK_THREADS = 8


@dataclass(frozen=True)
class FeedbackRow:
    """One validated verdict; URIs absolute."""

    line: int
    image_uri: str
    product_line: str
    label: str
    mask_uri: str | None = None
    reviewer: str | None = None
    reviewed_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Feedback:
    """A validated feedback table."""

    uri: str
    sha256: str
    rows: tuple[FeedbackRow, ...]

    def for_line(self, product_line: str) -> tuple[FeedbackRow, ...]:
        return tuple(r for r in self.rows if r.product_line == product_line)


class FeedbackError(ValueError):
    """The feedback table cannot be used; ``problems`` lists every problem found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(self.describe("nothing was trained or promoted"))

    def describe(self, outcome: str) -> str:
        """The problems, with what the command did not do (training's by default; the report
        says it wrote no report)."""
        count = len(self.problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        problems = f"{count} problem{'s' if count != 1 else ''}"
        return f"feedback {self.source}: {problems}, {outcome}:\n{lines}"


def _records(data: bytes, uri: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line, cells)]) of a CSV or Parquet table, names lower-cased."""
    if uri.lower().endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        header = [name.strip().lower() for name in table.column_names]
        cells = table.to_pylist()
        return header, [
            (i + 2, {k.strip().lower(): "" if v is None else str(v).strip() for k, v in r.items()})
            for i, r in enumerate(cells)
        ]
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig")))
    try:
        header = [cell.strip().lower() for cell in next(reader)]
    except StopIteration:
        raise FeedbackError(uri, [Problem(None, None, "the file is empty")]) from None
    rows = []
    for record in reader:
        if any(cell.strip() for cell in record):
            rows.append(
                (reader.line_num, {c: v.strip() for c, v in zip(header, record, strict=False)})
            )
    return header, rows


def _header_problems(header: list[str]) -> list[Problem]:
    problems = [
        Problem(1, name or "(empty)", f"unknown column; allowed: {', '.join(COLUMNS)}")
        for name in header
        if name not in COLUMNS
    ]
    problems += [Problem(1, n, "required column is missing") for n in REQUIRED_COLUMNS
                 if n not in header]  # fmt: skip
    return problems


def _parse_row(
    line: int,
    cells: dict[str, str],
    known_lines: set[str] | None,
    base_dir: str | None,
    options: StorageOptions | None,
) -> tuple[FeedbackRow | None, list[Problem]]:
    problems = [Problem(line, c, "required value is missing") for c in REQUIRED_COLUMNS
                if not cells.get(c)]  # fmt: skip
    label = cells.get("label", "").lower()
    if label and label not in LABELS:
        problems.append(
            Problem(line, "label", f"{cells['label']!r} is neither {NORMAL!r} nor {DEFECT!r}")
        )
    name = cells.get("product_line", "")
    if name and known_lines is not None and name not in known_lines:
        problems.append(
            Problem(line, "product_line", f"product line {name!r} has no model and is not in "
                    "the manifest")
        )  # fmt: skip
    uris: dict[str, str | None] = {"image_uri": None, "mask_uri": None}
    for column in uris:
        if cells.get(column):
            try:
                uris[column] = storage.cell_uri(cells[column], base_dir, options, "feedback table")
            except ValueError as exc:
                problems.append(Problem(line, column, storage.redact(str(exc))))
    when = cells.get("reviewed_at") or None
    if when:
        try:
            dt.datetime.fromisoformat(when)
        except ValueError:
            problems.append(Problem(line, "reviewed_at", f"{when!r} is not an ISO 8601 time"))
    if problems:
        return None, problems
    row = FeedbackRow(line, uris["image_uri"], name, label, uris["mask_uri"],
                      cells.get("reviewer") or None, when)  # fmt: skip
    return row, []


def _missing(rows: Iterable[FeedbackRow], options: StorageOptions | None) -> list[Problem]:
    """One problem per row whose image (or mask) does not exist, checked in parallel."""
    checks = [(r, c, getattr(r, c)) for r in rows for c in ("image_uri", "mask_uri")
              if getattr(r, c)]  # fmt: skip
    with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
        found = list(pool.map(lambda item: storage.exists(item[2], options), checks))
    return [
        Problem(row.line, column, f"not found: {uri}")
        for (row, column, uri), ok in zip(checks, found, strict=True)
        if not ok
    ]


def _conflicts(rows: list[FeedbackRow]) -> list[Problem]:
    first: dict[tuple[str, str], FeedbackRow] = {}
    problems = []
    for row in rows:
        key = (row.product_line, row.image_uri)
        seen = first.setdefault(key, row)
        if seen is not row and seen.label != row.label:
            problems.append(
                Problem(row.line, "label", f"{row.label!r} contradicts {seen.label!r} for the "
                        f"same image on line {seen.line}")
            )  # fmt: skip
    return problems


def load_feedback(
    uri: str, known_lines: set[str] | None, options: StorageOptions | None = None
) -> Feedback:
    """Read and validate a feedback table; FeedbackError lists every problem.

    ``known_lines``: product lines a verdict may name (the manifest's lines and the lines that
    already have a model; None: any). Relative paths are resolved against a local table's directory.
    """
    try:
        data = storage.read_bytes(uri, options)
    except FileNotFoundError:
        raise FeedbackError(uri, [Problem(None, None, "file not found")]) from None
    try:
        header, records = _records(data, uri)
    except (csv.Error, UnicodeDecodeError, OSError, ValueError) as exc:
        if isinstance(exc, FeedbackError):
            raise
        problem = Problem(None, None, f"not a CSV or Parquet table ({exc})")
        raise FeedbackError(uri, [problem]) from None
    problems = _header_problems(header)
    if problems:
        raise FeedbackError(uri, problems)
    local = "://" not in uri or uri.startswith("file://")
    base_dir = os.path.dirname(os.path.abspath(uri.removeprefix("file://"))) if local else None
    rows: list[FeedbackRow] = []
    for line, cells in records:
        row, row_problems = _parse_row(line, cells, known_lines, base_dir, options)
        problems += row_problems
        if row is not None:
            rows.append(row)
    problems += _conflicts(rows) + _missing(rows, options)
    if not problems and not rows:
        problems.append(Problem(None, None, "no verdicts: the table has only a header"))
    if problems:
        raise FeedbackError(uri, sorted(problems, key=lambda p: (p.line or 0, p.column or "")))
    return Feedback(uri, hashlib.sha256(data).hexdigest(), tuple(rows))
