"""Tiling and non-square input (issue 12): square resize vs HxW vs tiles, end to end in dfr_core.

    python benchmarks/tiling.py synthetic --cache /tmp/tiling-data --configs square256,tile256
    python benchmarks/tiling.py kolektor --data ../shared/datasets/kolektorsdd/kolektorsdd \\
        --configs square256,hw640x256

Protocol (both datasets): the normal training images are split three ways
(dfr_core.train.holdout_splits: training / early stopping + score scales / calibration); every
image goes through `dfr_core.geometry.prepare_image` with the configuration's geometry; fit,
calibrate (thresholds on the held-out normal images' stitched maps), then the test images are
scored with `dfr_core.inference.forward_images`. Pixel metrics: each map is upsampled to the
mask's ORIGINAL resolution (dfr_core.evaluate_images), and with --also-256 additionally both are
resized to 256 x 256 (map bilinear, mask nearest) as the PatchCore reference does.
One markdown row per configuration (and per resolution); the timing columns are wall clock on
whatever else the machine was running (load average printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiling_data import FullSet, load_full, write_synthetic  # noqa: E402

from dfr_core.calibrate import calibrate  # noqa: E402
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig  # noqa: E402
from dfr_core.evaluate_images import evaluate_image_outputs  # noqa: E402
from dfr_core.geometry import prepare_image  # noqa: E402
from dfr_core.inference import ImageOutput, forward_images  # noqa: E402
from dfr_core.model import DFRModel, build_extractor  # noqa: E402
from dfr_core.train import fit, holdout_splits  # noqa: E402

#: name -> ModelConfig geometry fields
CONFIGS: dict[str, dict] = {
    "square256": {"image_size": 256},
    "hw640x256": {"image_size": (640, 256)},
    "hw1024x384": {"image_size": (1024, 384)},
    "tile256": {"tile": 256, "tile_overlap": 32, "max_tiles": 128},
    "tile256s0.5": {"tile": 256, "tile_overlap": 32, "tile_scale": 0.5, "max_tiles": 128},
    "tile256s0.52": {"tile": 256, "tile_overlap": 32, "tile_scale": 0.52, "max_tiles": 128},
}

HEADER = (
    "| dataset | config | pixels scored at | image AUROC | pixel AUROC | PRO@0.3 | "
    "recall @ cal. thr | real. FPR | train inputs | fit s | ms/img | ms/MP |"
)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _prepare(cfg: ModelConfig, images: list[np.ndarray]) -> list:
    return [prepare_image(cfg, img) for img in images]


def _score(model: DFRModel, cfg: ModelConfig, images: list[np.ndarray], chunk: int) -> tuple:
    """Test outputs, prepared a few images at a time (tiles of 2k images are large)."""
    outs: list[ImageOutput] = []
    t0 = time.perf_counter()
    for i in range(0, len(images), chunk):
        outs += forward_images(model, _prepare(cfg, images[i : i + chunk]), batch_size=16)
    return outs, time.perf_counter() - t0


def run_config(name: str, data: FullSet, args: argparse.Namespace) -> list[str]:
    cfg = ModelConfig(**CONFIGS[name])
    tcfg = TrainConfig(epochs=args.epochs, tiles_per_image=args.tiles_per_image, seed=0)
    split = holdout_splits(len(data.train), tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed)
    torch.manual_seed(0)
    extractor = build_extractor(cfg)
    t0 = time.perf_counter()
    train = _prepare(cfg, [data.train[i] for i in split.train])
    es = _prepare(cfg, [data.train[i] for i in split.early_stopping])
    fitted = fit(extractor, cfg, tcfg, train, es)
    fit_s = time.perf_counter() - t0
    del train, es
    cal = calibrate(
        fitted.model, _prepare(cfg, [data.train[i] for i in split.calibration]),
        CalibrationConfig(),
    )  # fmt: skip
    outs, seconds = _score(fitted.model, cfg, data.test, args.chunk)
    megapixels = sum(img.shape[0] * img.shape[1] for img in data.test) / 1e6
    ms_img, ms_mp = 1000 * seconds / len(data.test), 1000 * seconds / megapixels
    rows = []
    for label, size in [("original", None)] + ([("256x256", (256, 256))] if args.also_256 else []):
        r = evaluate_image_outputs(outs, data.masks, data.labels, cal, ms_img, size)
        rows.append(
            f"| {args.dataset} | {name} | {label} | {_fmt(r.image_auroc)} | {_fmt(r.pixel_auroc)} "
            f"| {_fmt(r.pro)} | {_fmt(r.realised_image_recall)} | {_fmt(r.realised_image_fpr)} "
            f"| {fitted.summary['train_inputs']} | {fit_s:.0f} | {ms_img:.0f} | {ms_mp:.0f} |"
        )
    return rows


def load(args: argparse.Namespace) -> FullSet:
    if args.dataset == "synthetic":
        root = write_synthetic(
            Path(args.cache), args.line, args.size, args.n_train, args.n_good, args.n_defect, 0
        )
        return load_full(root)
    data = load_full(Path(args.data), args.max_train)
    keep = np.arange(0, len(data.test), args.test_stride)  # every k-th test image (CPU)
    return FullSet(
        data.train, [data.test[i] for i in keep], [data.masks[i] for i in keep], data.labels[keep]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dataset", choices=["synthetic", "kolektor"])
    p.add_argument("--data", help="kolektor: the MVTec-layout folder")
    p.add_argument("--cache", default="/tmp/tiling-data", help="synthetic: where PNGs go")
    p.add_argument("--line", default="wood_panel")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--n-train", type=int, default=30)
    p.add_argument("--n-good", type=int, default=10)
    p.add_argument("--n-defect", type=int, default=10)
    p.add_argument("--max-train", type=int, default=None, help="first N training images")
    p.add_argument("--test-stride", type=int, default=1, help="kolektor: every k-th test image")
    p.add_argument("--configs", default="square256,tile256")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--tiles-per-image", type=int, default=0)
    p.add_argument("--chunk", type=int, default=4, help="test images prepared at once")
    p.add_argument("--also-256", action="store_true", help="pixel metrics at 256x256 too")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load(args)
    print(
        f"{args.dataset}: {len(data.train)} train, {len(data.test)} test "
        f"({int(data.labels.sum())} defective); epochs {args.epochs}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for name in args.configs.split(","):
        for row in run_config(name, data, args):
            print(row, flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
