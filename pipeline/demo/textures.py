"""The product lines' looks: procedural, deterministic by seed, pure numpy + Pillow.

* ``metal_plate``  - brushed metal (anisotropic streaks), four countersunk holes,
  lighting gradient.
* ``woven_fabric`` - plain weave of blue warp / pale weft threads with jitter.
* ``wood_panel``   - elongated growth rings with turbulence and fine pores.
* ``ceramic_tile`` - speckled cream glaze with grey grout lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

FloatImage = np.ndarray  # HxWx3 float64 in [0, 255]


# --------------------------------------------------------------------------- helpers


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def filtered_noise(
    rng: np.random.Generator,
    size: int,
    sigma_along: float,
    sigma_across: float,
    angle: float = 0.0,
) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise (periodic, via FFT).

    ``sigma_along`` is the spatial correlation length (px) in direction ``angle``
    (radians, image x axis = 0, y pointing down); ``sigma_across`` perpendicular to it.
    """
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    fa = fx * c + fy * s
    fb = -fx * s + fy * c
    gain = np.exp(-2.0 * math.pi**2 * ((sigma_along * fa) ** 2 + (sigma_across * fb) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * gain, s=(size, size))
    out -= out.mean()
    std = out.std()
    return out / std if std > 0 else out


def frame(
    rng: np.random.Generator, size: int, max_rot_deg: float, max_shift: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Part coordinates (px, centred) after a small random rotation and shift."""
    theta = math.radians(rng.uniform(-max_rot_deg, max_rot_deg))
    sx, sy = rng.uniform(-max_shift, max_shift, 2) * size
    centre = (size - 1) / 2.0
    yy, xx = np.indices((size, size), dtype=np.float64)
    x = xx - centre - sx
    y = yy - centre - sy
    c, s = math.cos(theta), math.sin(theta)
    return x * c + y * s, -x * s + y * c, theta


def lut(rng: np.random.Generator, idx: np.ndarray, sigma: float, n: int) -> np.ndarray:
    """Random per-cell factor ``1 + N(0, sigma)`` looked up by integer cell index."""
    table = 1.0 + rng.normal(0.0, sigma, 2 * n + 1)
    return table[np.clip(idx + n, 0, 2 * n).astype(np.intp)]


def to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def luma(img: FloatImage) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114])


# ------------------------------------------------------------------- product lines


def _render_metal_plate(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, theta = frame(rng, size, max_rot_deg=4.0, max_shift=0.03)
    brightness = rng.uniform(0.92, 1.08)
    streak = filtered_noise(rng, size, 16.0 * s, 0.5 * s, theta)
    fine = filtered_noise(rng, size, 4.0 * s, 0.35 * s, theta)
    mottle = filtered_noise(rng, size, 14.0 * s, 14.0 * s)
    g = rng.uniform(0.0, 2.0 * math.pi)
    yy, xx = np.indices((size, size), dtype=np.float64)
    ramp = ((xx - size / 2) * math.cos(g) + (yy - size / 2) * math.sin(g)) / size
    lum = (150.0 + 9.0 * streak + 4.0 * fine + 4.0 * mottle + 28.0 * ramp) * brightness
    img = lum[..., None] * np.array([0.96, 1.0, 1.05])

    # four countersunk holes near the corners (in part coordinates)
    light = rng.uniform(0.0, 2.0 * math.pi)
    lx, ly = math.cos(light), math.sin(light)
    r_hole = 0.05 * size
    r_rim = r_hole + 2.5 * s
    for hx, hy in ((-0.33, -0.33), (0.33, -0.33), (-0.33, 0.33), (0.33, 0.33)):
        dx = u - hx * size
        dy = v - hy * size
        d = np.hypot(dx, dy)
        cos_l = (dx * lx + dy * ly) / np.maximum(d, 1e-6)
        a_rim = np.clip(r_rim - d + 0.5, 0.0, 1.0)[..., None]
        a_hole = np.clip(r_hole - d + 0.5, 0.0, 1.0)[..., None]
        rim = (140.0 - 55.0 * cos_l)[..., None] * brightness
        hole = (38.0 + 14.0 * cos_l * d / r_hole)[..., None]
        img = img * (1.0 - a_rim) + rim * a_rim
        img = img * (1.0 - a_hole) + hole * a_hole
    return img


def _render_woven_fabric(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, theta = frame(rng, size, max_rot_deg=3.0, max_shift=0.05)
    brightness = rng.uniform(0.9, 1.1)
    period = 9.0 * s
    uu = u / period + 0.07 * filtered_noise(rng, size, 12.0 * s, 12.0 * s)
    vv = v / period + 0.07 * filtered_noise(rng, size, 12.0 * s, 12.0 * s)
    i = np.floor(uu)
    j = np.floor(vv)
    fu = uu - i
    fv = vv - j
    warp_on_top = ((i + j) % 2) == 0
    pu = np.sin(math.pi * fu)
    pv = np.sin(math.pi * fv)
    warp = pu**0.6 * (0.6 + 0.4 * pv)  # warp runs along v, its width across u
    weft = pv**0.6 * (0.6 + 0.4 * pu)
    n_cells = int(size / period) + 8
    warp = warp * lut(rng, i, 0.06, n_cells)
    weft = weft * lut(rng, j, 0.06, n_cells)
    fib_warp = filtered_noise(rng, size, 5.0 * s, 0.4 * s, theta + math.pi / 2)
    fib_weft = filtered_noise(rng, size, 5.0 * s, 0.4 * s, theta)
    shade = np.where(warp_on_top, warp * (1 + 0.1 * fib_warp), weft * (1 + 0.1 * fib_weft))
    warp_col = np.array([66.0, 92.0, 148.0])
    weft_col = np.array([196.0, 190.0, 172.0])
    gap_col = np.array([28.0, 30.0, 38.0])
    col = np.where(warp_on_top[..., None], warp_col, weft_col)
    img = gap_col + (col - gap_col) * shade[..., None]
    return img * brightness


def _render_wood_panel(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, theta = frame(rng, size, max_rot_deg=5.0, max_shift=0.05)
    brightness = rng.uniform(0.9, 1.08)
    cx = rng.uniform(-0.4, 0.4) * size
    cy = rng.uniform(1.0, 2.2) * size * rng.choice([-1.0, 1.0])
    turb = filtered_noise(rng, size, 18.0 * s, 6.0 * s, theta)
    r = np.hypot(0.3 * (u - cx), v - cy)
    t = r / (rng.uniform(7.0, 9.5) * s) + 0.45 * turb
    f = t - np.floor(t)
    late = smoothstep(0.5, 0.8, f) * (1.0 - smoothstep(0.88, 1.0, f))
    pores = filtered_noise(rng, size, 22.0 * s, 0.5 * s, theta)
    blotch = filtered_noise(rng, size, 20.0 * s, 20.0 * s)
    m = np.clip(0.75 * late + 0.1 * pores + 0.08 * blotch + 0.1, 0.0, 1.0)[..., None]
    light = np.array([206.0, 156.0, 102.0])
    dark = np.array([128.0, 80.0, 44.0])
    return (light * (1.0 - m) + dark * m) * brightness


def _render_ceramic_tile(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, _ = frame(rng, size, max_rot_deg=2.0, max_shift=0.04)
    brightness = rng.uniform(0.93, 1.05)
    period = 0.46 * size
    a = (u - period / 2) / period
    b = (v - period / 2) / period
    ti = np.floor(a)  # tile index changes on the grout lines (integer a / b)
    tj = np.floor(b)
    dist = np.minimum(np.abs(a - np.round(a)), np.abs(b - np.round(b))) * period
    half_w = 1.7 * s
    grout_a = (1.0 - smoothstep(half_w - 0.5, half_w + 0.7, dist))[..., None]
    bevel = 0.86 + 0.14 * smoothstep(half_w, half_w + 4.0 * s, dist)

    tile_col = np.array([228.0, 221.0, 204.0]) * lut(rng, ti * 7 + tj, 0.025, 64)[..., None]
    speck_n = filtered_noise(rng, size, 0.8 * s, 0.8 * s)
    speck = smoothstep(1.9, 2.6, speck_n)[..., None]
    speck_col = np.where(
        (filtered_noise(rng, size, 3.0 * s, 3.0 * s) > 0)[..., None],
        np.array([150.0, 118.0, 92.0]),
        np.array([120.0, 122.0, 128.0]),
    )
    glaze = 6.0 * filtered_noise(rng, size, 24.0 * s, 24.0 * s)
    tile = (tile_col * (1.0 - speck) + speck_col * speck + glaze[..., None]) * bevel[..., None]
    grout = np.array([122.0, 118.0, 112.0]) + 5.0 * filtered_noise(rng, size, 1.0, 1.0)[..., None]
    img = tile * (1.0 - grout_a) + grout * grout_a
    return img * brightness


RENDERERS: dict[str, Callable[[np.random.Generator, int], FloatImage]] = {
    "metal_plate": _render_metal_plate,
    "woven_fabric": _render_woven_fabric,
    "wood_panel": _render_wood_panel,
    "ceramic_tile": _render_ceramic_tile,
}

PRODUCT_LINES: tuple[str, ...] = tuple(RENDERERS)
