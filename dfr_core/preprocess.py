"""Image preprocessing shared by training, evaluation and the scoring pipeline.

Every path into the model goes through these two functions, so that a model scores an image
identically whether it is called directly or from the distributed job.
"""

from __future__ import annotations

import numpy as np
import torch

# decoding workers import these from dfr_core.resize directly (no torch there)
from dfr_core.resize import resize_image, to_rgb_uint8

__all__ = ["normalize_batch", "prepare_batch", "resize_image", "to_rgb_uint8"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_batch(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32 with ImageNet mean/std, on the input's device."""
    t = torch.as_tensor(images)
    if t.ndim != 4 or t.shape[-1] != 3:
        raise ValueError(f"expected a (B, H, W, 3) uint8 batch, got shape {tuple(t.shape)}")
    x = t.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def prepare_batch(images: list[np.ndarray], size: int) -> torch.Tensor:
    """Decoded arrays of any size -> a normalised model batch (B, 3, size, size)."""
    return normalize_batch(np.stack([resize_image(img, size) for img in images]))
