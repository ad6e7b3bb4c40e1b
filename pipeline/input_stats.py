"""Cheap per-image input statistics for the drift watch: brightness, contrast, sharpness.

Computed on the resized (S, S, 3) uint8 image the model sees (pooled over its tiles for a tiled
model, see tiles_stats), by the scoring job's decode stage (one row each, stored in the score
table) and by training on the line's normal images (the reference stored in model.json), so
both sides measure exactly the same thing. A new lighting rig moves brightness/contrast, a
defocused camera moves sharpness, before any score moves.
"""

from __future__ import annotations

import numpy as np

#: Column names in the score table and keys of the stored reference, in this order.
STAT_NAMES: tuple[str, ...] = ("brightness", "contrast", "sharpness")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_stats(image: np.ndarray) -> tuple[float, float, float]:
    """(mean luma, luma standard deviation, mean |Laplacian| of luma) of one uint8 image.

    The Laplacian is the 4-neighbour one on the luma plane: blur lowers it, noise raises it.
    """
    gray = image.astype(np.float32) @ _LUMA if image.ndim == 3 else image.astype(np.float32)
    lap = (
        4.0 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    )
    sharpness = float(np.abs(lap).mean()) if lap.size else 0.0
    return float(gray.mean()), float(gray.std()), sharpness


def batch_stats(images: np.ndarray) -> dict[str, list[float]]:
    """{name: values} for (N, S, S, 3) uint8 images (the training-side reference)."""
    values = [image_stats(image) for image in images]
    return {name: [v[k] for v in values] for k, name in enumerate(STAT_NAMES)}


def tiles_stats(tiles: np.ndarray) -> tuple[float, float, float]:
    """image_stats of one image given as its model inputs (N, h, w, 3): one input (an untiled
    model) is exactly image_stats; several tiles pool their pixels (equal sizes: the mean of
    the means, the pooled standard deviation, the mean sharpness), so no seam between two
    tiles counts as an edge. Overlapping pixels count once per tile that holds them."""
    if len(tiles) == 1:
        return image_stats(tiles[0])
    per_tile = np.array([image_stats(tile) for tile in tiles], dtype=np.float64)
    means, stds, sharpness = per_tile[:, 0], per_tile[:, 1], per_tile[:, 2]
    mean = float(means.mean())
    variance = float((stds**2 + means**2).mean()) - mean**2
    return mean, float(np.sqrt(max(variance, 0.0))), float(sharpness.mean())
