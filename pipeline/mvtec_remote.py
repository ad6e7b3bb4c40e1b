"""Labelled test sets in MVTec AD layout at any storage URI (local directory or S3 prefix).

``{uri}/test/<kind>/<name>.<ext>`` with kind ``good`` for normal images, and for every other
kind a mask ``{uri}/ground_truth/<kind>/<stem>_mask.png``: the rule of dfr_core.datasets
(``mask_of``), whose reader reads local folders only (dfr_core may not import storage; its
docstring says why two thin readers remain). This module lists with one recursive listing per
folder, so it costs two requests on S3 however many images there are, and it reads through
the same storage and decode path as training.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from dfr_core.config import size_hw
from dfr_core.datasets import GOOD, mask_of
from dfr_core.decode import DecodeError, decode_mask
from pipeline import storage
from pipeline.image_sets import READ_THREADS, ImageFailure, canonical_uri, read_image
from pipeline.storage import IMAGE_SUFFIXES, StorageOptions


class LabelledSample(NamedTuple):
    image_uri: str
    defect: str  # "good" for normal images
    mask_uri: str | None


class LabelledSet(NamedTuple):
    """images (N, S, S, 3) uint8, masks (N, S, S) bool, labels (N,) 1 = defective."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    samples: list[LabelledSample]
    failures: list[ImageFailure]


class LabelledSetError(ValueError):
    """A test set that does not follow the MVTec layout (the message names the URI)."""


def _relative(base: str, uri: str) -> list[str]:
    return uri[len(base.rstrip("/")) + 1 :].split("/")


def list_labelled_set(uri: str, options: StorageOptions | None = None) -> list[LabelledSample]:
    """Every test image with its defect kind and mask URI; a missing mask is an error."""
    uri = canonical_uri(uri, options)
    test_uri = storage.join_uri(uri, "test")
    try:
        images = storage.list_files(test_uri, suffixes=IMAGE_SUFFIXES, options=options)
    except FileNotFoundError:
        raise LabelledSetError(f"{uri}: no test/ folder (expected MVTec AD layout)") from None
    gt_uri = storage.join_uri(uri, "ground_truth")
    try:
        masks = set(storage.list_files(gt_uri, options=options))
    except FileNotFoundError:
        masks = set()
    samples: list[LabelledSample] = []
    for image in images:
        parts = _relative(test_uri, image)
        if len(parts) != 2:
            raise LabelledSetError(
                f"{image}: test images must lie directly in test/<kind>/ (MVTec AD layout)"
            )
        kind, name = parts
        where = mask_of(kind, name)
        mask = None
        if where is not None:
            try:
                mask = storage.join_uri(gt_uri, *where)
            except ValueError as exc:
                raise LabelledSetError(f"{image}: cannot name its mask ({exc})") from None
            if mask not in masks:
                raise LabelledSetError(f"{image}: ground-truth mask {mask} not found")
        samples.append(LabelledSample(image, kind, mask))
    if not samples:
        raise LabelledSetError(f"{uri}: test/ holds no images")
    return samples


def _read_mask(uri: str, size: int | tuple[int, int], options: StorageOptions | None) -> np.ndarray:
    """Binarised mask resized with nearest neighbour (dfr_core.decode, as dfr_core.datasets)."""
    return decode_mask(storage.read_bytes(uri, options), size)


def _read_sample(
    sample: LabelledSample, size: int | tuple[int, int], options: StorageOptions | None
) -> tuple[np.ndarray, np.ndarray] | ImageFailure:
    try:
        image = read_image(sample.image_uri, size, options)
        mask = (
            np.zeros(size_hw(size), dtype=bool)
            if sample.mask_uri is None
            else _read_mask(sample.mask_uri, size, options)
        )
    except DecodeError as exc:
        return ImageFailure(sample.image_uri, exc.reason)
    return image, mask


def load_labelled_set(
    uri: str, size: int | tuple[int, int], options: StorageOptions | None = None
) -> LabelledSet:
    """Read a labelled set; unreadable images (or masks) are skipped and reported as failures."""
    return load_samples(list_labelled_set(uri, options), size, options)


def load_samples(
    samples: list[LabelledSample],
    size: int | tuple[int, int],
    options: StorageOptions | None = None,
) -> LabelledSet:
    """Read labelled samples from anywhere (a listing, feedback); a defect without a mask gets
    an all-zero mask, so pixel metrics must skip it (pipeline.evaluation does)."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(pool.map(lambda s: _read_sample(s, size, options), samples))
    kept = [
        (s, r) for s, r in zip(samples, results, strict=True) if not isinstance(r, ImageFailure)
    ]
    n = len(kept)
    images = np.empty((n, *size_hw(size), 3), dtype=np.uint8)
    masks = np.zeros((n, *size_hw(size)), dtype=bool)
    for i, (_, (image, mask)) in enumerate(kept):
        images[i], masks[i] = image, mask
    labels = np.array([s.defect != GOOD for s, _ in kept], dtype=np.int64)
    failures = [r for r in results if isinstance(r, ImageFailure)]
    return LabelledSet(images, masks, labels, [s for s, _ in kept], failures)
