"""Connected components for the PRO metric: scipy.ndimage.label (dfr_core.pro now) against
another version of dfr_core/metrics.py (e.g. the hand-written run-based union-find it replaced;
the PRO code lived there before dfr_core/pro.py), in alternating runs on the same masks; checks
the region weights are identical.

    git show fb65c62:dfr_core/metrics.py > /tmp/old_metrics.py
    python benchmarks/components.py /tmp/old_metrics.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np

from dfr_core import pro as current


def _load(path: str):
    spec = importlib.util.spec_from_file_location("other_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ground_truth(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Half the masks empty, the others with 1-3 round defects (test-set ground truth)."""
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((n, size, size), bool)
    for i in range(0, n, 2):
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.integers(30, size - 30, 2)
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(4, 25)) ** 2
    return masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("other", help="path of another dfr_core/metrics.py (or pro.py)")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    other = _load(args.other)
    rng = np.random.default_rng(0)
    masks = _ground_truth(rng, args.images, 256)
    maps = rng.random(masks.shape).astype(np.float32)
    assert np.array_equal(other._region_weights(masks), current._region_weights(masks))
    times: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, module in (("other", other), ("current", current)):
            start = time.perf_counter()
            module._region_weights(masks)
            mid = time.perf_counter()
            module.aupro(masks, maps)
            end = time.perf_counter()
            times.setdefault(f"{name} labels", []).append(mid - start)
            times.setdefault(f"{name} aupro", []).append(end - mid)
    for key, values in times.items():
        print(f"{key:16s} median {1000 * float(np.median(values)):7.1f} ms")
    ratio = np.median(times["current aupro"]) / np.median(times["other aupro"])
    print(f"aupro current/other: {ratio:.2f} ({args.images} x 256 x 256 masks)")


if __name__ == "__main__":
    main()
