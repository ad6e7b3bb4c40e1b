"""Procedural industrial-part images with drawn defects, written in MVTec AD layout.

Real datasets may not live in the repository, so demos and tests generate their own
small archives here.  Everything is pure numpy + Pillow and deterministic by seed.

Product lines (clearly different looks):

* ``metal_plate``  - brushed metal (anisotropic streaks), four countersunk holes,
  lighting gradient.
* ``woven_fabric`` - plain weave of blue warp / pale weft threads with jitter.
* ``wood_panel``   - elongated growth rings with turbulence and fine pores.
* ``ceramic_tile`` - speckled cream glaze with grey grout lines.

Defects (test images only): ``scratch`` (thin bright or dark polyline), ``spot`` (soft
blob of different intensity and colour) and ``crack`` (dark jagged branching line).
:func:`render_defect` first calls :func:`render_normal` with the *same* generator and then
draws the defect on top, so ``render_normal(line, default_rng(s))`` is the defect-free
version of ``render_defect(line, d, default_rng(s))``.
"""

from __future__ import annotations

import math
import os
import pathlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "DEFECT_TYPES",
    "PRODUCT_LINES",
    "SyntheticSpec",
    "render_defect",
    "render_normal",
    "write_mvtec_dataset",
]

DEFECT_TYPES: tuple[str, ...] = ("scratch", "spot", "crack")
MIN_SIZE = 32

_SUPERSAMPLE = 4  # line defects are drawn at 4x and box-downsampled (anti-aliasing)
_MIN_VISIBLE_DIFF = 30.0  # mean |defect - normal| over the strongest 30 % of mask pixels
_MAX_DEFECT_TRIES = 8

FloatImage = np.ndarray  # HxWx3 float64 in [0, 255]


# --------------------------------------------------------------------------- helpers


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _filtered_noise(
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


def _frame(
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


def _lut(rng: np.random.Generator, idx: np.ndarray, sigma: float, n: int) -> np.ndarray:
    """Random per-cell factor ``1 + N(0, sigma)`` looked up by integer cell index."""
    table = 1.0 + rng.normal(0.0, sigma, 2 * n + 1)
    return table[np.clip(idx + n, 0, 2 * n).astype(np.intp)]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _luma(img: FloatImage) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114])


# ------------------------------------------------------------------- product lines


def _render_metal_plate(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, theta = _frame(rng, size, max_rot_deg=4.0, max_shift=0.03)
    brightness = rng.uniform(0.92, 1.08)
    streak = _filtered_noise(rng, size, 16.0 * s, 0.5 * s, theta)
    fine = _filtered_noise(rng, size, 4.0 * s, 0.35 * s, theta)
    mottle = _filtered_noise(rng, size, 14.0 * s, 14.0 * s)
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
    u, v, theta = _frame(rng, size, max_rot_deg=3.0, max_shift=0.05)
    brightness = rng.uniform(0.9, 1.1)
    period = 9.0 * s
    uu = u / period + 0.07 * _filtered_noise(rng, size, 12.0 * s, 12.0 * s)
    vv = v / period + 0.07 * _filtered_noise(rng, size, 12.0 * s, 12.0 * s)
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
    warp = warp * _lut(rng, i, 0.06, n_cells)
    weft = weft * _lut(rng, j, 0.06, n_cells)
    fib_warp = _filtered_noise(rng, size, 5.0 * s, 0.4 * s, theta + math.pi / 2)
    fib_weft = _filtered_noise(rng, size, 5.0 * s, 0.4 * s, theta)
    shade = np.where(warp_on_top, warp * (1 + 0.1 * fib_warp), weft * (1 + 0.1 * fib_weft))
    warp_col = np.array([66.0, 92.0, 148.0])
    weft_col = np.array([196.0, 190.0, 172.0])
    gap_col = np.array([28.0, 30.0, 38.0])
    col = np.where(warp_on_top[..., None], warp_col, weft_col)
    img = gap_col + (col - gap_col) * shade[..., None]
    return img * brightness


def _render_wood_panel(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, theta = _frame(rng, size, max_rot_deg=5.0, max_shift=0.05)
    brightness = rng.uniform(0.9, 1.08)
    cx = rng.uniform(-0.4, 0.4) * size
    cy = rng.uniform(1.0, 2.2) * size * rng.choice([-1.0, 1.0])
    turb = _filtered_noise(rng, size, 18.0 * s, 6.0 * s, theta)
    r = np.hypot(0.3 * (u - cx), v - cy)
    t = r / (rng.uniform(7.0, 9.5) * s) + 0.45 * turb
    f = t - np.floor(t)
    late = _smoothstep(0.5, 0.8, f) * (1.0 - _smoothstep(0.88, 1.0, f))
    pores = _filtered_noise(rng, size, 22.0 * s, 0.5 * s, theta)
    blotch = _filtered_noise(rng, size, 20.0 * s, 20.0 * s)
    m = np.clip(0.75 * late + 0.1 * pores + 0.08 * blotch + 0.1, 0.0, 1.0)[..., None]
    light = np.array([206.0, 156.0, 102.0])
    dark = np.array([128.0, 80.0, 44.0])
    return (light * (1.0 - m) + dark * m) * brightness


def _render_ceramic_tile(rng: np.random.Generator, size: int) -> FloatImage:
    s = size / 128.0
    u, v, _ = _frame(rng, size, max_rot_deg=2.0, max_shift=0.04)
    brightness = rng.uniform(0.93, 1.05)
    period = 0.46 * size
    a = (u - period / 2) / period
    b = (v - period / 2) / period
    ti = np.floor(a)  # tile index changes on the grout lines (integer a / b)
    tj = np.floor(b)
    dist = np.minimum(np.abs(a - np.round(a)), np.abs(b - np.round(b))) * period
    half_w = 1.7 * s
    grout_a = (1.0 - _smoothstep(half_w - 0.5, half_w + 0.7, dist))[..., None]
    bevel = 0.86 + 0.14 * _smoothstep(half_w, half_w + 4.0 * s, dist)

    tile_col = np.array([228.0, 221.0, 204.0]) * _lut(rng, ti * 7 + tj, 0.025, 64)[..., None]
    speck_n = _filtered_noise(rng, size, 0.8 * s, 0.8 * s)
    speck = _smoothstep(1.9, 2.6, speck_n)[..., None]
    speck_col = np.where(
        (_filtered_noise(rng, size, 3.0 * s, 3.0 * s) > 0)[..., None],
        np.array([150.0, 118.0, 92.0]),
        np.array([120.0, 122.0, 128.0]),
    )
    glaze = 6.0 * _filtered_noise(rng, size, 24.0 * s, 24.0 * s)
    tile = (tile_col * (1.0 - speck) + speck_col * speck + glaze[..., None]) * bevel[..., None]
    grout = np.array([122.0, 118.0, 112.0]) + 5.0 * _filtered_noise(rng, size, 1.0, 1.0)[..., None]
    img = tile * (1.0 - grout_a) + grout * grout_a
    return img * brightness


_RENDERERS: dict[str, Callable[[np.random.Generator, int], FloatImage]] = {
    "metal_plate": _render_metal_plate,
    "woven_fabric": _render_woven_fabric,
    "wood_panel": _render_wood_panel,
    "ceramic_tile": _render_ceramic_tile,
}

PRODUCT_LINES: tuple[str, ...] = tuple(_RENDERERS)


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
    mean = float(_luma(img).mean())
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
    alpha = 1.0 - _smoothstep(0.55, 1.0, d)  # soft edge
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


_DEFECTS: dict[str, Callable[[FloatImage, np.random.Generator, int], tuple]] = {
    "scratch": _scratch,
    "spot": _spot,
    "crack": _crack,
}
assert tuple(_DEFECTS) == DEFECT_TYPES


# ---------------------------------------------------------------------- public API


def _check_product_line(product_line: str) -> None:
    if product_line not in _RENDERERS:
        raise ValueError(
            f"unknown product line {product_line!r}; valid: {', '.join(PRODUCT_LINES)}"
        )


def _check_defect(defect: str) -> None:
    if defect not in _DEFECTS:
        raise ValueError(f"unknown defect type {defect!r}; valid: {', '.join(DEFECT_TYPES)}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def _render_float(product_line: str, rng: np.random.Generator, size: int) -> FloatImage:
    return np.clip(_RENDERERS[product_line](rng, int(size)), 0.0, 255.0)


def render_normal(product_line: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One defect-free image (``size x size x 3`` uint8) of ``product_line``.

    ``rng`` is a :class:`numpy.random.Generator` (an int seed is also accepted).
    """
    _check_product_line(product_line)
    _check_size(size)
    rng = np.random.default_rng(rng)
    return _to_uint8(_render_float(product_line, rng, size))


def render_defect(
    product_line: str, defect: str, rng: np.random.Generator, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """A defective image and its ground-truth mask.

    Returns ``(image HxWx3 uint8, mask HxW uint8 in {0, 255})``; the mask is non-empty,
    covers the drawn defect (thin lines dilated to >= 3 px) and stays off the border.
    The image is ``render_normal(product_line, rng, size)`` (same generator state) with
    the defect drawn on top; placements too faint to see (e.g. a crack inside a dark
    hole) are redrawn.
    """
    _check_product_line(product_line)
    _check_defect(defect)
    _check_size(size)
    rng = np.random.default_rng(rng)
    base = _to_uint8(_render_float(product_line, rng, size)).astype(np.float64)
    draw = _DEFECTS[defect]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_DEFECT_TRIES):
        out, mask = draw(base, rng, size)
        img = _to_uint8(out)
        if not mask.any():
            continue
        diff = np.sort(np.abs(img.astype(np.float64) - base).mean(axis=2)[mask])
        visible = float(diff[int(0.7 * diff.size) :].mean())
        if best is None or visible > best[0]:
            best = (visible, img, mask)
        if visible >= _MIN_VISIBLE_DIFF:
            break
    if best is None:  # pragma: no cover - every drawer yields a non-empty mask
        raise RuntimeError(f"could not draw a {defect!r} defect")
    _, img, mask = best
    return img, mask.astype(np.uint8) * 255


@dataclass(frozen=True)
class SyntheticSpec:
    """What :func:`write_mvtec_dataset` generates (counts are per product line)."""

    product_lines: tuple[str, ...] = PRODUCT_LINES
    n_train: int = 40
    n_test_good: int = 10
    n_test_defect: int = 10  # split across DEFECT_TYPES round-robin
    size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        lines = self.product_lines
        if isinstance(lines, str):
            lines = (lines,)
        object.__setattr__(self, "product_lines", tuple(lines))
        if not self.product_lines:
            raise ValueError(f"product_lines is empty; valid: {', '.join(PRODUCT_LINES)}")
        for line in self.product_lines:
            _check_product_line(line)
        if len(set(self.product_lines)) != len(self.product_lines):
            raise ValueError(f"duplicate product lines in {self.product_lines!r}")
        for name in ("n_train", "n_test_good", "n_test_defect", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        _check_size(self.size)


_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2


def _image_rng(seed: int, line: str, split: int, index: int) -> np.random.Generator:
    """Independent stream per image: counts of one split never change another's images."""
    key = zlib.crc32(line.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed), key, split, index]))


def _save_png(array: np.ndarray, path: pathlib.Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def write_mvtec_dataset(root: str | os.PathLike, spec: SyntheticSpec) -> dict[str, pathlib.Path]:
    """Write a synthetic MVTec-AD-style archive; returns ``{line: root/line}``.

    Layout per product line: ``train/good/NNN.png``, ``test/good/NNN.png``,
    ``test/<defect>/NNN.png`` and ``ground_truth/<defect>/NNN_mask.png`` (``NNN`` counts
    from 000 per folder).  Same spec -> byte-identical files.
    """
    if not isinstance(spec, SyntheticSpec):
        raise TypeError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    for line in spec.product_lines:  # re-check: frozen dataclasses can be bypassed
        _check_product_line(line)
    root = pathlib.Path(root)
    size = int(spec.size)
    out: dict[str, pathlib.Path] = {}
    for line in spec.product_lines:
        line_dir = root / line
        train_dir = line_dir / "train" / "good"
        test_good_dir = line_dir / "test" / "good"
        for d in (train_dir, test_good_dir):
            d.mkdir(parents=True, exist_ok=True)
        for i in range(spec.n_train):
            img = render_normal(line, _image_rng(spec.seed, line, _SPLIT_TRAIN, i), size)
            _save_png(img, train_dir / f"{i:03d}.png")
        for i in range(spec.n_test_good):
            img = render_normal(line, _image_rng(spec.seed, line, _SPLIT_TEST_GOOD, i), size)
            _save_png(img, test_good_dir / f"{i:03d}.png")
        per_defect = dict.fromkeys(DEFECT_TYPES, 0)
        for k in range(spec.n_test_defect):
            defect = DEFECT_TYPES[k % len(DEFECT_TYPES)]
            n = per_defect[defect]
            per_defect[defect] += 1
            rng = _image_rng(spec.seed, line, _SPLIT_TEST_DEFECT, k)
            img, mask = render_defect(line, defect, rng, size)
            img_dir = line_dir / "test" / defect
            mask_dir = line_dir / "ground_truth" / defect
            img_dir.mkdir(parents=True, exist_ok=True)
            mask_dir.mkdir(parents=True, exist_ok=True)
            _save_png(img, img_dir / f"{n:03d}.png")
            _save_png(mask, mask_dir / f"{n:03d}_mask.png")
        out[line] = line_dir
    return out
