"""Sets of training images named by one URI: a prefix/directory, or a list file of image URIs.

Used by manifest validation (count what a row points at, before any Ray work) and by the
training task (read what it points at), so both see exactly the same images.

Reading goes through :mod:`pipeline.storage` and :mod:`dfr_core.decode`, the paths the scoring
job uses, so local and S3 archives behave alike and a corrupt file is reported with the same
reason codes everywhere.
"""

from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from dfr_core.config import size_hw
from dfr_core.decode import DecodeError, decode_resized
from pipeline import storage
from pipeline.storage import (  # noqa: F401 - canonical_uri re-exported (moved to storage)
    IMAGE_SUFFIXES,
    StorageOptions,
    canonical_uri,
)

#: A URI with one of these suffixes is read as a list of image URIs, not as an image prefix.
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".csv", ".lst")
#: Column names recognised (in this order) when a CSV list file has a header.
LIST_COLUMNS: tuple[str, ...] = ("uri", "image_uri", "path", "image_path")
#: Parallel object reads per task: S3 GETs are latency-bound, decoding releases the GIL.
READ_THREADS = 8


class ImageFailure(NamedTuple):
    """An image that could not be used and why (a DecodeError reason code or 'missing')."""

    uri: str
    reason: str


class LoadedImages(NamedTuple):
    """Decoded images resized to (N, S, S, 3) uint8, the URIs they came from, and failures."""

    images: np.ndarray
    uris: list[str]
    failures: list[ImageFailure]


def is_list_file(uri: str) -> bool:
    """True when `uri` names a list of image URIs rather than a prefix of images."""
    return uri.lower().rstrip("/").endswith(LIST_SUFFIXES)


def _resolve_entry(entry: str, list_uri: str) -> str:
    """An absolute URI stays as is; a relative one is taken relative to the list file's folder
    (storage.resolve_relative: ``../../secret.png`` is refused, not read)."""
    return storage.resolve_relative(entry, storage.folder_of(list_uri), "list entry")


def parse_list_file(text: str, list_uri: str) -> list[str]:
    """Image URIs from a list file: one per line, or a CSV whose header names a URI column.

    Blank lines and lines starting with '#' are ignored. A CSV with a header uses the first of
    LIST_COLUMNS present; without a recognised header the first column is used.
    """
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return []
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    header = [cell.strip().lower() for cell in rows[0]]
    column = 0
    for name in LIST_COLUMNS:
        if name in header:
            column, rows = header.index(name), rows[1:]
            break
    entries = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    return [_resolve_entry(entry, list_uri) for entry in entries]


def resolve_images(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The image URIs a manifest cell names, sorted for a list prefix, in file order for a list.

    A missing prefix or list file raises FileNotFoundError naming the URI (storage does).
    """
    if is_list_file(uri):
        return parse_list_file(storage.read_text(uri, options), uri)
    return storage.list_files(uri, suffixes=IMAGE_SUFFIXES, options=options)


def read_image(
    uri: str, size: int | tuple[int, int], options: StorageOptions | None = None
) -> np.ndarray:
    """Read, decode and resize one image to (S, S, 3) (or (H, W, 3)) uint8 (DecodeError when
    unusable)."""
    return decode_resized(storage.read_bytes(uri, options), size).pixels


def _read_or_failure(
    uri: str, size: int | tuple[int, int], options: StorageOptions | None
) -> np.ndarray | ImageFailure:
    try:
        return read_image(uri, size, options)
    except DecodeError as exc:
        return ImageFailure(uri, exc.reason)
    except FileNotFoundError:  # a list file naming an object that is gone
        return ImageFailure(uri, "missing")


def load_images(
    uris: list[str], size: int | tuple[int, int], options: StorageOptions | None = None
) -> LoadedImages:
    """Read many images in parallel; unusable ones are returned as failures, not raised.

    Other errors (connection failures, permissions) propagate: they are not properties of the
    image, and the caller decides whether to retry.
    """
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(pool.map(lambda u: _read_or_failure(u, size, options), uris))
    good = [(u, r) for u, r in zip(uris, results, strict=True) if isinstance(r, np.ndarray)]
    failures = [r for r in results if isinstance(r, ImageFailure)]
    images = np.empty((len(good), *size_hw(size), 3), dtype=np.uint8)
    for i, (_, array) in enumerate(good):
        images[i] = array
    return LoadedImages(images, [u for u, _ in good], failures)
