"""Image preprocessing shared by training, evaluation and the scoring pipeline.

Every path into the model goes through these two functions, so that a model scores an image
identically whether it is called directly or from the distributed job.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert a decoded image array to HxWx3 uint8.

    Accepts grayscale (HxW or HxWx1), RGB, RGBA (alpha dropped) and 16-bit or float data, since
    industrial cameras produce all of these; anything else is a ValueError naming the shape.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"unsupported image array shape {arr.shape}")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return (arr >> 8).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_:
        top = max(int(arr.max()), 1)
        return (arr.astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize any decoded image to the model's size x size RGB uint8 input.

    Antialiased bilinear (torch), so that large archive images are downsampled without aliasing;
    the result stays uint8 so the decode stage ships 4x fewer bytes to the model stage.
    """
    rgb = to_rgb_uint8(image)
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    # decoded arrays are often read-only views of PIL buffers; torch needs a writable array
    t = torch.from_numpy(rgb if rgb.flags.writeable else rgb.copy()).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0].permute(1, 2, 0)
    return np.ascontiguousarray(out.numpy())


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
