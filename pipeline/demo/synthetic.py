"""Procedural industrial-part images with drawn defects, written in MVTec AD layout.

Real datasets may not live in the repository, so demos and tests generate their own
small archives here.  Everything is pure numpy + Pillow and deterministic by seed
(looks: pipeline/demo/textures.py, defects: pipeline/demo/defects.py).

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

import os
import pathlib
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipeline.demo.defects import DEFECT_TYPES, DEFECTS
from pipeline.demo.textures import PRODUCT_LINES, RENDERERS, FloatImage, to_uint8

__all__ = [
    "DEFECT_TYPES",
    "PRODUCT_LINES",
    "SyntheticSpec",
    "render_defect",
    "render_normal",
    "write_mvtec_dataset",
]

MIN_SIZE = 32
_MIN_VISIBLE_DIFF = 30.0  # mean |defect - normal| over the strongest 30 % of mask pixels
_MAX_DEFECT_TRIES = 8


# ---------------------------------------------------------------------- public API


def _check_product_line(product_line: str) -> None:
    if product_line not in RENDERERS:
        raise ValueError(
            f"unknown product line {product_line!r}; valid: {', '.join(PRODUCT_LINES)}"
        )


def _check_defect(defect: str) -> None:
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect type {defect!r}; valid: {', '.join(DEFECT_TYPES)}")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def _render_float(product_line: str, rng: np.random.Generator, size: int) -> FloatImage:
    return np.clip(RENDERERS[product_line](rng, int(size)), 0.0, 255.0)


def render_normal(product_line: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One defect-free image (``size x size x 3`` uint8) of ``product_line``.

    ``rng`` is a :class:`numpy.random.Generator` (an int seed is also accepted).
    """
    _check_product_line(product_line)
    _check_size(size)
    rng = np.random.default_rng(rng)
    return to_uint8(_render_float(product_line, rng, size))


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
    base = to_uint8(_render_float(product_line, rng, size)).astype(np.float64)
    draw = DEFECTS[defect]
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(_MAX_DEFECT_TRIES):
        out, mask = draw(base, rng, size)
        img = to_uint8(out)
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
