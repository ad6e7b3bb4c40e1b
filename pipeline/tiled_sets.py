"""Image sets for tiled models: every image through `dfr_core.geometry.prepare_image`.

An untiled model's images are resized to its input when read (pipeline.image_sets,
pipeline.mvtec_remote: one (N, H, W, 3) array). A tiled model's images have their own sizes and
become (tiles, plan) pairs instead; their ground-truth masks stay at the ORIGINAL resolution, so
evaluation scores the stitched map (upsampled to the mask) at the pixels the defect really has
(dfr_core.evaluate_images). An image the geometry refuses (smaller than a tile, more tiles than
max_tiles) is a failure with the geometry's reason, like an undecodable one.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from dfr_core.config import ModelConfig
from dfr_core.decode import DecodeError, decode_image
from dfr_core.geometry import GeometryError, TilePlan, prepare_image
from dfr_core.resize import to_rgb_uint8
from pipeline import storage
from pipeline.image_sets import READ_THREADS, ImageFailure, LoadedImages
from pipeline.mvtec_remote import GOOD, LabelledSample
from pipeline.storage import StorageOptions

Prepared = tuple[np.ndarray, TilePlan]


class TiledSet(NamedTuple):
    """A labelled set for a tiled model: ``images`` prepared, ``masks`` bool at each image's
    original size (None: a defect without a mask, pixels unknown), labels 1 = defective."""

    images: list[Prepared]
    masks: list[np.ndarray | None]
    labels: np.ndarray
    samples: list[LabelledSample]
    failures: list[ImageFailure]


def _prepared(uri: str, config: ModelConfig, options: StorageOptions | None) -> Prepared:
    return prepare_image(config, decode_image(storage.read_bytes(uri, options)))


def _or_failure(fn, uri: str) -> Any:
    try:
        return fn()
    except DecodeError as exc:
        return ImageFailure(uri, exc.reason)
    except GeometryError as exc:
        return ImageFailure(uri, str(exc.reason))
    except FileNotFoundError:
        return ImageFailure(uri, "missing")


def load_prepared(
    uris: list[str], config: ModelConfig, options: StorageOptions | None = None
) -> LoadedImages:
    """Read many images for a tiled model (images: a list of (tiles, plan)); failures as in
    pipeline.image_sets.load_images."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(
            pool.map(lambda u: _or_failure(lambda: _prepared(u, config, options), u), uris)
        )
    good = [(u, r) for u, r in zip(uris, results, strict=True) if not isinstance(r, ImageFailure)]
    failures = [r for r in results if isinstance(r, ImageFailure)]
    return LoadedImages([r for _, r in good], [u for u, _ in good], failures)  # type: ignore[arg-type]


def read_mask_full(uri: str, hw: tuple[int, int], options: StorageOptions | None) -> np.ndarray:
    """A ground-truth mask, binarised (any channel above half range), at the image's original
    (H, W); nearest neighbour when it was stored at another size."""
    mask = to_rgb_uint8(decode_image(storage.read_bytes(uri, options))).max(axis=2) > 127
    if mask.shape != tuple(hw):
        img = Image.fromarray(mask).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
        mask = np.asarray(img, dtype=bool)
    return mask


def _sample(
    sample: LabelledSample, config: ModelConfig, options: StorageOptions | None
) -> tuple[Prepared, np.ndarray | None]:
    tiles, plan = _prepared(sample.image_uri, config, options)
    hw = (plan.height, plan.width)
    if sample.mask_uri is None:
        return (tiles, plan), (np.zeros(hw, dtype=bool) if sample.defect == GOOD else None)
    return (tiles, plan), read_mask_full(sample.mask_uri, hw, options)


def load_tiled_set(
    samples: Sequence[LabelledSample], config: ModelConfig, options: StorageOptions | None = None
) -> TiledSet:
    """Read labelled samples for a tiled model; unusable images are failures."""
    with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        results = list(
            pool.map(
                lambda s: _or_failure(lambda: _sample(s, config, options), s.image_uri), samples
            )
        )
    kept = [
        (s, r) for s, r in zip(samples, results, strict=True) if not isinstance(r, ImageFailure)
    ]
    return TiledSet(
        [r[0] for _, r in kept],
        [r[1] for _, r in kept],
        np.array([s.defect != GOOD for s, _ in kept], dtype=np.int64),
        [s for s, _ in kept],
        [r for r in results if isinstance(r, ImageFailure)],
    )


def take(images: np.ndarray | list, index: np.ndarray) -> np.ndarray | list:
    """Rows ``index`` of an image array or of a list of prepared images."""
    if isinstance(images, np.ndarray):
        return images[index]
    return [images[int(i)] for i in index]


def join(first: np.ndarray | list, second: np.ndarray | list) -> np.ndarray | list:
    """Two image sets of the same kind, concatenated."""
    if isinstance(first, np.ndarray):
        return np.concatenate([first, second])
    return list(first) + list(second)
