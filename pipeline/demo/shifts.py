"""Generated "nights" with the input shifts the drift watch must catch (tests, benchmarks).

A brighter night (a new light: +35 grey levels), a blurred night (a defocused lens: Gaussian
radius 1.5 px on the 128 px original), a rotated night (parts mounted 90 degrees turned: normal,
but unlike the training images, so a model flags them until QA feedback teaches it), and a
defective night, all from pipeline.demo.synthetic and resized as the scoring job's decode stage
does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from dfr_core.preprocess import resize_image
from pipeline.demo.synthetic import DEFECT_TYPES, render_defect, render_normal

RAW_SIZE = 128


def brighten(img: np.ndarray, delta: int = 35) -> np.ndarray:
    return np.clip(img.astype(np.int16) + delta, 0, 255).astype(np.uint8)


def blur(img: np.ndarray, radius: float = 1.5) -> np.ndarray:
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))


def rotate(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.rot90(img))


def normal_images(line: str, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    return [render_normal(line, rng, RAW_SIZE) for _ in range(n)]


def shifted_nights(line: str, seed: int, n: int, size: int) -> dict[str, np.ndarray]:
    """{kind: (n, size, size, 3) uint8} for kinds normal, brighter, blurred, defective."""
    rng = np.random.default_rng(10_000 + seed)
    raw = normal_images(line, rng, n)
    defects = [render_defect(line, DEFECT_TYPES[i % 3], rng, RAW_SIZE)[0] for i in range(n)]
    kinds = {
        "normal": raw,
        "brighter": [brighten(x) for x in raw],
        "blurred": [blur(x) for x in raw],
        "defective": defects,
    }
    return {k: np.stack([resize_image(x, size) for x in v]) for k, v in kinds.items()}
