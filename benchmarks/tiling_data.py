"""Data for benchmarks/tiling.py: a synthetic high-resolution line and KolektorSDD as decoded,
full-resolution images with masks at the original resolution.

Synthetic line: `pipeline.demo.synthetic.render_normal` parts (default ``wood_panel``) at
2048 x 2048, with ONE small defect each in the defective test images: a soft spot of diameter
6-24 px or a thin scratch 6-24 px long (2 px wide), intensity shifted by 50-80 grey levels;
masks known exactly. Seeded; written once as PNGs in MVTec layout under ``--cache`` and read
back through dfr_core.datasets (the decoder the pipeline uses).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from dfr_core.datasets import GOOD, list_category, mask_name, read_image
from dfr_core.resize import to_rgb_uint8
from pipeline.demo.synthetic import render_normal


class FullSet(NamedTuple):
    train: list[np.ndarray]  # decoded RGB uint8, original sizes
    test: list[np.ndarray]
    masks: list[np.ndarray]  # bool, original sizes
    labels: np.ndarray


def small_defect(
    img: np.ndarray, rng: np.random.Generator, min_px: int = 6, max_px: int = 24
) -> tuple[np.ndarray, np.ndarray]:
    """One spot (diameter d) or scratch (length d, 2 px wide), d in [min_px, max_px]."""
    h, w = img.shape[:2]
    d = float(rng.uniform(min_px, max_px))
    cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
    alpha_img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(alpha_img)
    if rng.random() < 0.5:
        r = d / 2.0
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        a = rng.uniform(0, math.pi)
        dx, dy = math.cos(a) * d / 2.0, math.sin(a) * d / 2.0
        draw.line((cx - dx, cy - dy, cx + dx, cy + dy), fill=255, width=2)
    alpha = np.asarray(alpha_img, dtype=np.float64) / 255.0
    mean = float(img.mean())
    sign = -1.0 if mean > 150 else (1.0 if mean < 100 else float(rng.choice([-1.0, 1.0])))
    delta = sign * rng.uniform(50.0, 80.0) * rng.uniform(0.9, 1.1, 3)
    out = np.clip(img.astype(np.float64) + alpha[..., None] * delta, 0, 255).astype(np.uint8)
    return out, alpha > 0.2


def write_synthetic(
    root: Path, line: str, size: int, n_train: int, n_good: int, n_defect: int, seed: int
) -> Path:
    """MVTec layout under root/<line>_<size> (skipped when already complete)."""
    out = root / f"{line}_{size}_s{seed}"
    done = out / "DONE"
    if done.is_file():
        return out
    for sub in ("train/good", "test/good", "test/small", "ground_truth/small"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train + n_good + n_defect):
        rng = np.random.default_rng([seed, i])
        img = render_normal(line, rng, size)
        if i < n_train:
            Image.fromarray(img).save(out / "train/good" / f"{i:03d}.png")
        elif i < n_train + n_good:
            Image.fromarray(img).save(out / "test/good" / f"{i:03d}.png")
        else:
            img, mask = small_defect(img, rng)
            Image.fromarray(img).save(out / "test/small" / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(
                out / "ground_truth/small" / mask_name(f"{i:03d}.png")
            )
    done.write_text("ok\n")
    return out


def _mask_full(path: Path | None, hw: tuple[int, int]) -> np.ndarray:
    """The binarised mask at the image's original size (nearest if stored at another size)."""
    if path is None:
        return np.zeros(hw, dtype=bool)
    mask = to_rgb_uint8(read_image(path)).max(axis=2) > 127
    if mask.shape != hw:
        img = Image.fromarray(mask).resize((hw[1], hw[0]), Image.Resampling.NEAREST)
        mask = np.asarray(img, dtype=bool)
    return mask


def load_full(root: Path, max_train: int | None = None) -> FullSet:
    """Every image decoded at its original size (RGB uint8) and masks at the same size."""
    train_paths, samples = list_category(root)
    if max_train:
        train_paths = train_paths[:max_train]
    train = [to_rgb_uint8(read_image(p)) for p in train_paths]
    test, masks = [], []
    for s in samples:
        img = to_rgb_uint8(read_image(s.image))
        test.append(img)
        masks.append(_mask_full(s.mask, img.shape[:2]))
    labels = np.array([s.defect != GOOD for s in samples], dtype=np.int64)
    return FullSet(train, test, masks, labels)
