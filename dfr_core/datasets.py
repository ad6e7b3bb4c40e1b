"""Reader for datasets in MVTec AD layout (CAT/train/good, CAT/test/<type>, CAT/ground_truth).

The layout rule is defined here once (:func:`mask_of`: which test images have a mask, and
where it lies) and the decoding is dfr_core.decode's; pipeline.mvtec_remote applies both to
labelled sets at any storage URI. Why two thin readers remain: this one reads local folders
with pathlib for the benchmarks and the real-data tests, and dfr_core may not import the
storage layer (fsspec/S3); the pipeline's lists an S3 prefix with one request per folder and
reads in threads. What differs is only that I/O, and what each caller needs of an absent
part: a category without ``test/`` is still trainable here, while the pipeline's reader is
for evaluation sets, where it is an error.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dfr_core.decode import decode_image, decode_mask, decode_resized

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
#: The defect kind of normal images (``test/good``, ``train/good``).
GOOD = "good"


def mask_name(image_name: str) -> str:
    """The ground-truth mask file of a test image: ``ground_truth/<kind>/<stem>_mask.png``."""
    return f"{os.path.splitext(image_name)[0]}_mask.png"


def mask_of(kind: str, image_name: str) -> tuple[str, str] | None:
    """Where the mask of test image ``test/<kind>/<image_name>`` lies below ``ground_truth/``:
    ``(kind, <stem>_mask.png)``; None for a normal (``good``) image, which has none."""
    return None if kind == GOOD else (kind, mask_name(image_name))


class Sample(NamedTuple):
    image: Path
    defect: str  # "good" for normal images
    mask: Path | None


class Split(NamedTuple):
    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) bool
    labels: np.ndarray  # (N,) 1 = defective
    defects: list[str]
    paths: list[Path]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def list_category(root: str | os.PathLike) -> tuple[list[Path], list[Sample]]:
    """(train images, test samples) of one category; a defect image without mask is an error."""
    root = Path(root)
    train_dir = root / "train" / GOOD
    if not train_dir.is_dir():
        raise FileNotFoundError(f"{root}: no train/good folder (expected MVTec AD layout)")
    test: list[Sample] = []
    test_dir = root / "test"
    for kind in (
        sorted(d.name for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []
    ):
        for img in _images_in(test_dir / kind):
            parts = mask_of(kind, img.name)
            mask = None if parts is None else root.joinpath("ground_truth", *parts)
            if mask is not None and not mask.is_file():
                raise FileNotFoundError(f"{img}: ground-truth mask {mask} not found")
            test.append(Sample(img, kind, mask))
    return _images_in(train_dir), test


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode a local file through dfr_core.decode (the pipeline's decoder, so benchmarks and
    real-data tests see the pixels the scoring job sees): HxW or HxWxC array."""
    return decode_image(Path(path).read_bytes())


def read_mask(path: str | os.PathLike, size: int) -> np.ndarray:
    """Binarised mask resized with nearest neighbour to size x size (dfr_core.decode)."""
    return decode_mask(Path(path).read_bytes(), size)


def load_images(paths: list[Path], size: int) -> np.ndarray:
    """Read and resize to (N, S, S, 3) uint8."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)
    for i, p in enumerate(paths):
        out[i] = decode_resized(Path(p).read_bytes(), size).pixels
    return out


def load_test(samples: list[Sample], size: int) -> Split:
    images = load_images([s.image for s in samples], size)
    masks = np.zeros((len(samples), size, size), dtype=bool)
    for i, s in enumerate(samples):
        if s.mask is not None:
            masks[i] = read_mask(s.mask, size)
    labels = np.array([s.defect != GOOD for s in samples], dtype=np.int64)
    return Split(images, masks, labels, [s.defect for s in samples], [s.image for s in samples])
