"""Drawn defects: ``scratch`` (thin bright or dark polyline), ``spot`` (soft blob of different
intensity and colour) and ``crack`` (dark jagged branching line), each returning the image with
the defect and its mask."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.demo.textures import FloatImage, luma, smoothstep

_SUPERSAMPLE = 4  # line defects are drawn at 4x and box-downsampled (anti-aliasing)


# ------------------------------------------------------------------------- defects


def _inside(points: np.ndarray, size: int, margin: float) -> bool:
    return bool(np.all(points >= margin) and np.all(points <= size - 1 - margin))


def _line_alpha(size: int, polylines: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines ``(points Nx2 (x, y) px, width px)``."""
    big = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    for points, width in polylines:
        xy = [((x + 0.5) * _SUPERSAMPLE, (y + 0.5) * _SUPERSAMPLE) for x, y in points]
        w = max(1, round(width * _SUPERSAMPLE))
        draw.line(xy, fill=255, width=w, joint="curve")
        r = w / 2.0
        for x, y in (xy[0], xy[-1]):  # round caps
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    small = big.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _line_mask(alpha: np.ndarray) -> np.ndarray:
    """Everything the line touched, dilated by 1 px (thin lines -> >= 3 px wide)."""
    touched = Image.fromarray(((alpha > 0.02) * 255).astype(np.uint8))
    return np.asarray(touched.filter(ImageFilter.MaxFilter(3))) > 0


def _choose_sign(img: FloatImage, rng: np.random.Generator) -> float:
    """Bright or dark change, avoiding directions that would clip against 0/255."""
    mean = float(luma(img).mean())
    if mean > 175.0:
        return -1.0
    if mean < 90.0:
        return 1.0
    return float(rng.choice([-1.0, 1.0]))


def _scratch(img: FloatImage, rng: np.random.Generator, size: int):
    s = size / 128.0
    margin = max(0.06 * size, 4.0)
    for _ in range(20):
        start = rng.uniform(0.2, 0.8, 2) * size
        angle = rng.uniform(0.0, 2.0 * math.pi)
        n_seg = int(rng.integers(3, 6))
        seg_len = rng.uniform(0.22, 0.45) * size / n_seg
        pts = [start]
        for _ in range(n_seg):
            angle += rng.normal(0.0, 0.12)
            pts.append(pts[-1] + seg_len * np.array([math.cos(angle), math.sin(angle)]))
        points = np.array(pts)
        if _inside(points, size, margin):
            break
    points = np.clip(points, margin, size - 1 - margin)
    alpha = _line_alpha(size, [(points, rng.uniform(1.2, 2.0) * max(s, 1.0))])
    delta = _choose_sign(img, rng) * rng.uniform(60.0, 90.0) * rng.uniform(0.92, 1.08, 3)
    out = img + alpha[..., None] * delta
    return out, _line_mask(alpha)


def _spot(img: FloatImage, rng: np.random.Generator, size: int):
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    radius = rng.uniform(0.055, 0.1) * size
    yy, xx = np.indices((size, size), dtype=np.float64)
    dx, dy = xx - cx, yy - cy
    phi = np.arctan2(dy, dx)
    wobble = np.ones_like(phi)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.03, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    stretch = rng.uniform(0.75, 1.0)
    rot = rng.uniform(0.0, math.pi)
    ex = dx * math.cos(rot) + dy * math.sin(rot)
    ey = (-dx * math.sin(rot) + dy * math.cos(rot)) / stretch
    d = np.hypot(ex, ey) / (radius * wobble)
    alpha = 1.0 - smoothstep(0.55, 1.0, d)  # soft edge
    sign = _choose_sign(img, rng)
    tint = rng.normal(0.0, 1.0, 3)
    tint = 28.0 * tint / (np.linalg.norm(tint) + 1e-9)
    delta = sign * rng.uniform(50.0, 75.0) + tint
    mean_col = img.reshape(-1, 3).mean(axis=0)
    a = alpha[..., None]
    damp = 0.55 * a  # the stain partly hides the texture, then shifts intensity / colour
    out = img * (1.0 - damp) + mean_col * damp + a * delta
    return out, alpha >= 0.2


def _random_walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, n: int, step: float
) -> np.ndarray:
    pts = [start]
    for _ in range(n):
        a = heading + rng.normal(0.0, 0.55)  # jagged around a main direction
        ln = step * rng.uniform(0.6, 1.4)
        pts.append(pts[-1] + ln * np.array([math.cos(a), math.sin(a)]))
    return np.array(pts)


def _crack(img: FloatImage, rng: np.random.Generator, size: int):
    s = size / 128.0
    margin = max(0.05 * size, 4.0)
    for _ in range(20):
        heading = rng.uniform(0.0, 2.0 * math.pi)
        start = rng.uniform(0.25, 0.75, 2) * size
        n = int(rng.integers(9, 15))
        trunk = _random_walk(rng, start, heading, n, 4.5 * s)
        width = rng.uniform(1.4, 2.2) * max(s, 1.0)  # never sub-pixel
        lines = [(trunk, width)]
        for _ in range(int(rng.integers(1, 4))):
            at = int(rng.integers(2, n - 1))
            side = rng.choice([-1.0, 1.0])
            branch_heading = heading + side * rng.uniform(0.5, 1.1)
            branch = _random_walk(rng, trunk[at], branch_heading, int(rng.integers(3, 7)), 3.5 * s)
            lines.append((branch, 0.65 * width))
        if all(_inside(p, size, margin) for p, _ in lines):
            break
    lines = [(np.clip(p, margin, size - 1 - margin), w) for p, w in lines]
    alpha = _line_alpha(size, lines)
    k = rng.uniform(0.75, 0.9)
    crack_col = np.array([24.0, 20.0, 18.0])
    a = k * alpha[..., None]
    out = img * (1.0 - a) + crack_col * a
    return out, _line_mask(alpha)


DEFECTS: dict[str, Callable[[FloatImage, np.random.Generator, int], tuple]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}
DEFECT_TYPES: tuple[str, ...] = tuple(DEFECTS)
