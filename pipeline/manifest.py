"""The product-line manifest: one CSV row per product line to train.

The whole manifest is validated before any Ray work starts, and every problem is reported at
once with its line number and column: a QA engineer fixing a 40-line manifest should not need
40 runs, and a run that trains half the lines before hitting a typo wastes a night.

Columns (header required, names case-insensitive):

* ``product_line`` (required) - becomes a path component of the model registry, so only
  ``[A-Za-z0-9._-]`` and no leading ``.``.
* ``train_uri`` (required) - a prefix/directory of normal images (searched recursively) or a
  ``.txt``/``.csv``/``.lst`` file listing image URIs.
* ``val_uri`` - held-out normal images for calibration (else a fraction of train_uri is held out).
* ``test_uri`` - an MVTec-layout labelled set; when given the model is evaluated on it.
* ``image_size`` (``N`` or ``HxW``, e.g. ``640x256``), ``epochs``, ``backbone`` - per-line
  overrides of the job's flags.
* the model options of :mod:`pipeline.model_options` (``preset``, ``layers``, ``feature_norm``,
  ``smoothing_sigma``, ``image_score``, ``topk_fraction``, ``score_norm``, ``global_weight``,
  ``tile``, ``tile_overlap``, ``tile_scale``, ``max_tiles``, ``pixel_fpr``, ``image_fpr``) -
  per-line overrides of the job's flags of the same name.

Relative local paths in a local manifest are resolved against the manifest's directory, so a
manifest can be moved together with its data.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from dfr_core.backbones import list_backbones
from pipeline import storage
from pipeline.image_sets import resolve_images
from pipeline.model_options import OPTION_NAMES, parse_cell, parse_image_size
from pipeline.mvtec_remote import LabelledSetError, list_labelled_set
from pipeline.storage import StorageOptions

REQUIRED_COLUMNS: tuple[str, ...] = ("product_line", "train_uri")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "val_uri",
    "test_uri",
    "image_size",
    "epochs",
    "backbone",
    *OPTION_NAMES,
)
COLUMNS: tuple[str, ...] = REQUIRED_COLUMNS + OPTIONAL_COLUMNS
URI_COLUMNS: tuple[str, ...] = ("train_uri", "val_uri", "test_uri")
#: Fewest training images a line may have: fit needs 2 and calibration at least 1 held out.
MIN_TRAIN_IMAGES = 4
_CHECK_THREADS = 8


@dataclass(frozen=True)
class ManifestRow:
    """One validated manifest row; URIs are absolute, overrides None when the cell was empty."""

    line: int
    product_line: str
    train_uri: str
    val_uri: str | None = None
    test_uri: str | None = None
    image_size: int | tuple[int, int] | None = None
    epochs: int | None = None
    backbone: str | None = None
    #: model options set in this row's cells (pipeline.model_options), typed; absent: not set
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy, stored in the model's config so a model records what made it."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the manifest; line None for problems of the whole file."""

    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [f"line {self.line}"] if self.line is not None else []
        if self.column is not None:
            where.append(f"column {self.column!r}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


class ManifestError(ValueError):
    """The manifest cannot be trained; `problems` lists every problem found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(
            f"manifest {source}: {count} problem{'s' if count != 1 else ''}, "
            f"nothing was trained:\n{lines}"
        )


@dataclass(frozen=True)
class ManifestCheck:
    """What load_manifest checks beyond the CSV itself."""

    min_train_images: int = MIN_TRAIN_IMAGES
    #: Train only these product lines (empty: all); each must be in the manifest.
    only: tuple[str, ...] = ()
    #: List every selected row's URIs and count its images (off only for offline unit tests).
    check_data: bool = True
    options: StorageOptions | None = None

    def __post_init__(self) -> None:
        if self.min_train_images < MIN_TRAIN_IMAGES:
            raise ValueError(
                f"min_train_images must be >= {MIN_TRAIN_IMAGES}, got {self.min_train_images}"
            )
        object.__setattr__(self, "only", tuple(self.only))


# --------------------------------------------------------------------------------------------
# cells


def _parse_int(value: str, check: Callable[[int], str | None]) -> tuple[int | None, str | None]:
    try:
        number = int(value)
    except ValueError:
        return None, f"{value!r} is not an integer"
    error = check(number)
    return (None, error) if error else (number, None)


def _epochs_error(epochs: int) -> str | None:
    return None if epochs >= 1 else f"epochs must be >= 1, got {epochs}"


def _product_line_error(name: str) -> str | None:
    try:
        storage.safe_component(name, "product_line")
    except ValueError as exc:
        return str(exc)
    if name.startswith("."):
        return f"product_line {name!r} must not start with '.' (reserved for temporary names)"
    return None


def _resolve_uri(value: str, base_dir: str | None, options: StorageOptions | None) -> str:
    """An absolute URI for a cell; ValueError with the reason when it cannot be one."""
    return storage.cell_uri(value, base_dir, options, "manifest")


# --------------------------------------------------------------------------------------------
# parsing


def _header_problems(header: list[str]) -> list[Problem]:
    problems = []
    seen: set[str] = set()
    for name in header:
        if name in seen:
            problems.append(Problem(1, name, "duplicate column"))
        elif name not in COLUMNS:
            problems.append(
                Problem(1, name or "(empty)", f"unknown column; allowed: {', '.join(COLUMNS)}")
            )
        seen.add(name)
    for name in REQUIRED_COLUMNS:
        if name not in header:
            problems.append(Problem(1, name, "required column is missing"))
    return problems


def _parse_row(
    line: int,
    cells: dict[str, str],
    base_dir: str | None,
    options: StorageOptions | None,
) -> tuple[ManifestRow | None, list[Problem]]:
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for column in REQUIRED_COLUMNS:
        if not cells.get(column):
            problems.append(Problem(line, column, "required value is missing"))
    name = cells.get("product_line", "")
    if name:
        error = _product_line_error(name)
        if error:
            problems.append(Problem(line, "product_line", error))
        values["product_line"] = name
    for column in URI_COLUMNS:
        if cells.get(column):
            try:
                values[column] = _resolve_uri(cells[column], base_dir, options)
            except ValueError as exc:
                problems.append(Problem(line, column, storage.redact(str(exc))))
    if cells.get("image_size"):
        size, error = parse_image_size(cells["image_size"])
        if error:
            problems.append(Problem(line, "image_size", error))
        values["image_size"] = size
    if cells.get("epochs"):
        number, error = _parse_int(cells["epochs"], _epochs_error)
        if error:
            problems.append(Problem(line, "epochs", error))
        values["epochs"] = number
    backbone = cells.get("backbone")
    if backbone:
        if backbone not in list_backbones():
            problems.append(
                Problem(
                    line,
                    "backbone",
                    f"unknown backbone {backbone!r}; known: {', '.join(list_backbones())}",
                )
            )
        values["backbone"] = backbone
    options: dict[str, Any] = {}
    for column in OPTION_NAMES:
        if cells.get(column):
            try:
                options[column] = parse_cell(column, cells[column])
            except ValueError as exc:
                problems.append(Problem(line, column, str(exc)))
    if problems:
        return None, problems
    return ManifestRow(line=line, options=options, **values), []


def parse_manifest(
    text: str,
    source: str,
    base_dir: str | None = None,
    options: StorageOptions | None = None,
) -> list[ManifestRow]:
    """CSV text -> rows, or ManifestError listing every syntax problem (no storage access).

    `base_dir` resolves relative paths (the manifest's directory for a local manifest; None
    for a remote one, where relative paths are an error).
    """
    reader = csv.reader(io.StringIO(text))
    try:
        header = [cell.strip().lower() for cell in next(reader)]
    except StopIteration:
        raise ManifestError(source, [Problem(None, None, "the file is empty")]) from None
    except csv.Error as exc:
        raise ManifestError(source, [Problem(1, None, f"not valid CSV ({exc})")]) from None
    problems = _header_problems(header)
    if problems:
        raise ManifestError(source, problems)
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if len(record) > len(header):
                problems.append(
                    Problem(line, None, f"{len(record)} fields but the header has {len(header)}")
                )
                continue
            cells = {col: cell.strip() for col, cell in zip(header, record, strict=False)}
            row, row_problems = _parse_row(line, cells, base_dir, options)
            problems += row_problems
            name = cells.get("product_line", "")
            if name and name in first_line:
                problems.append(
                    Problem(
                        line,
                        "product_line",
                        f"duplicate product line {name!r} (first on line {first_line[name]})",
                    )
                )
            elif name:
                first_line[name] = line
            if row is not None:
                rows.append(row)
    except csv.Error as exc:
        problems.append(Problem(reader.line_num, None, f"not valid CSV ({exc})"))
    if not problems and not rows:
        problems.append(Problem(None, None, "no product lines: the manifest has only a header"))
    if problems:
        raise ManifestError(source, problems)
    return rows


# --------------------------------------------------------------------------------------------
# data checks


def _count_problem(
    row: ManifestRow, column: str, uri: str, options: StorageOptions | None, minimum: int
) -> list[Problem]:
    try:
        count = len(resolve_images(uri, options))
    except FileNotFoundError:
        return [Problem(row.line, column, f"not found: {uri}")]
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return [Problem(row.line, column, storage.redact(f"cannot read {uri}: {exc}"))]
    if count < minimum:
        return [
            Problem(
                row.line,
                column,
                f"{uri} holds {count} image{'s' if count != 1 else ''} "
                f"(png/jpg/bmp/tiff), at least {minimum} needed",
            )
        ]
    return []


def _data_problems(row: ManifestRow, check: ManifestCheck) -> list[Problem]:
    """Problems with the data one row points at (listings only: no image is decoded here)."""
    options = check.options
    problems = _count_problem(row, "train_uri", row.train_uri, options, check.min_train_images)
    if row.val_uri is not None:
        if row.val_uri.rstrip("/") == row.train_uri.rstrip("/"):
            problems.append(
                Problem(row.line, "val_uri", "is the same as train_uri: calibration needs "
                        "images the model was not trained on")
            )  # fmt: skip
        else:
            problems += _count_problem(row, "val_uri", row.val_uri, options, 1)
    if row.test_uri is not None:
        try:
            list_labelled_set(row.test_uri, options)
        except LabelledSetError as exc:
            problems.append(Problem(row.line, "test_uri", storage.redact(str(exc))))
        except (OSError, ValueError) as exc:
            problems.append(
                Problem(row.line, "test_uri", storage.redact(f"cannot read {row.test_uri}: {exc}"))
            )
    return problems


def select_rows(rows: list[ManifestRow], only: tuple[str, ...], source: str) -> list[ManifestRow]:
    """The rows named by `only` (all when empty); an unknown name is a ManifestError."""
    if not only:
        return rows
    names = {row.product_line for row in rows}
    unknown = [name for name in only if name not in names]
    if unknown:
        raise ManifestError(
            source,
            [Problem(None, "--only", f"{name!r} is not a product line in the manifest")
             for name in unknown],
        )  # fmt: skip
    return [row for row in rows if row.product_line in set(only)]


def load_manifest(uri: str, check: ManifestCheck | None = None) -> list[ManifestRow]:
    """Read, parse and fully validate a manifest; the selected rows, or ManifestError."""
    check = check or ManifestCheck()
    try:
        fs, path = storage.get_fs(uri, check.options)
        data = storage.read_bytes(uri, check.options)
        text = data.decode("utf-8-sig")  # utf-8-sig: spreadsheets often prepend a BOM
    except FileNotFoundError:
        raise ManifestError(uri, [Problem(None, None, "manifest file not found")]) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(uri, [Problem(None, None, f"not UTF-8 text ({exc})")]) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(
            uri, [Problem(None, None, storage.redact(f"cannot read the manifest: {exc}"))]
        ) from None
    base_dir = os.path.dirname(path) if isinstance(fs, LocalFileSystem) else None
    rows = select_rows(parse_manifest(text, uri, base_dir, check.options), check.only, uri)
    if check.check_data:
        with ThreadPoolExecutor(max_workers=_CHECK_THREADS) as pool:
            found = list(pool.map(lambda row: _data_problems(row, check), rows))
        problems = [p for row_problems in found for p in row_problems]
        if problems:
            raise ManifestError(uri, problems)
    return rows
