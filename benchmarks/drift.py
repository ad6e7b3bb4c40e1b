"""Drift watch benchmark: how often a shifted night is flagged and a normal night is not.

    python benchmarks/drift.py synthetic --seeds 10
    python benchmarks/drift.py real --data ../shared/datasets/magnetic_tile/magnetic_tile \
        --data ../shared/datasets/kolektorsdd/kolektorsdd

``synthetic``: per seed, a tiny model is trained on generated normal images of one line
(pipeline.demo.synthetic), calibrated, and its drift reference stored as the training job does; then
four nights of new images are scored in process (the scoring job's forward pass and input
statistics): normal, brighter (+35 grey levels), blurred (Gaussian radius 1.5 px before the
resize) and defective. Prints, per night kind, how many seeds flag it and the median statistics.

``real``: per dataset, train on part of train/good, calibrate on a held-out slice, and compare a
"normal night" (the remaining held-out good images plus test/good) with a "defective night"
(test defect images): the drift statistics of each. Small subsets and few epochs (CPU budget).
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images
from dfr_core.model import build_extractor
from dfr_core.preprocess import resize_image
from dfr_core.train import fit
from pipeline.demo.shifts import normal_images, rotate, shifted_nights
from pipeline.demo.synthetic import render_normal
from pipeline.drift import DriftConfig, compute_drift
from pipeline.drift_io import make_reference, rows_of_images

SIZE = 64
LAYERS = ("features.1", "features.3")


def _model_configs(
    size: int, epochs: int, layers: tuple[str, ...], seed: int = 0
) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(backbone="mobilenet_v2", layers=layers, image_size=size)
    train = TrainConfig(epochs=epochs, batch_size=4, positions_per_image=64, patience=0, seed=seed)
    return model, train


def _train(
    normal: np.ndarray, calib: np.ndarray, size: int, epochs: int, layers=LAYERS, seed: int = 0
):
    model_cfg, train_cfg = _model_configs(size, epochs, layers, seed)
    fitted = fit(build_extractor(model_cfg), model_cfg, train_cfg, normal)
    cal = calibrate(fitted.model, calib, CalibrationConfig())
    return fitted.model, cal, make_reference(fitted.model, calib, normal, cal)


def run_synthetic(args: argparse.Namespace) -> None:
    config = DriftConfig()
    flagged: dict[str, list[bool]] = {}
    stats: dict[str, list[tuple[float, float, float]]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        normal = np.stack(
            [resize_image(render_normal(args.line, rng, 128), SIZE) for _ in range(args.train)]
        )
        n_cal = max(4, args.train // 5)
        model, cal, ref = _train(normal[n_cal:], normal[:n_cal], SIZE, args.epochs)
        for kind, images in shifted_nights(args.line, seed, args.night, SIZE).items():
            rows = rows_of_images(model, cal, images)
            d = compute_drift(rows, ref, config, args.line, "2024-01-01", f"s{seed}", "v")
            flagged.setdefault(kind, []).append(d.drifted)
            stats.setdefault(kind, []).append((d.anomaly_rate, d.score_ks, d.brightness_ks))
            if args.verbose:
                print(f"seed {seed} {kind:9s} drifted={d.drifted} reasons={d.reasons}")
    print(f"line {args.line}, {args.seeds} seeds, {args.train} training images "
          f"({max(4, args.train // 5)} calibration), {args.night} images per night, "
          f"{args.epochs} epochs, image size {SIZE}; level {config.level}, "
          f"min_ks {config.min_ks}; {time.perf_counter() - t0:.0f} s")  # fmt: skip
    print(f"{'night':10s} {'flagged':>9s} {'anom rate':>10s} {'score KS':>9s} {'bright KS':>10s}")
    for kind, values in flagged.items():
        med = np.median(np.array(stats[kind], dtype=float), axis=0)
        print(f"{kind:10s} {sum(values):>4d}/{len(values):<4d} {med[0]:>10.3f} {med[1]:>9.3f} "
              f"{med[2]:>10.3f}")  # fmt: skip


def run_feedback(args: argparse.Namespace) -> None:
    """Retraining with confirmed false positives (rotated parts) as extra normal images: the
    flag rate on other rotated parts at each model's own calibrated threshold (same 1 % FPR
    target, same calibration images)."""
    t0 = time.perf_counter()
    print(f"line {args.line}, {args.train} training images, {args.feedback} feedback images "
          f"(rotated normals), {args.held_out} held-out rotated images, {args.epochs} epochs, "
          f"size {SIZE}")  # fmt: skip
    print(f"{'seed':>4s} {'flagged before':>15s} {'flagged after':>14s} {'normal FPR before':>18s}"
          f" {'after':>6s}")  # fmt: skip
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        normal = np.stack(
            [resize_image(x, SIZE) for x in normal_images(args.line, rng, args.train)]
        )
        rotated = [rotate(x) for x in normal_images(args.line, rng, args.feedback + args.held_out)]
        rotated = np.stack([resize_image(x, SIZE) for x in rotated])
        test_normal = np.stack([resize_image(x, SIZE) for x in normal_images(args.line, rng, 40)])
        feedback, held_out = rotated[: args.feedback], rotated[args.feedback :]
        n_cal = max(4, args.train // 5)
        rates = []
        for extra in (None, feedback):
            train = normal[n_cal:] if extra is None else np.concatenate([normal[n_cal:], extra])
            model, cal, _ = _train(train, normal[:n_cal], SIZE, args.epochs)
            flagged = rows_of_images(model, cal, held_out)["is_anomaly"]
            fpr = rows_of_images(model, cal, test_normal)["is_anomaly"]
            rates.append((np.mean(flagged), np.mean(fpr)))
        (b, bf), (a, af) = rates
        print(f"{seed:>4d} {b:>15.2f} {a:>14.2f} {bf:>18.2f} {af:>6.2f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


def run_gate(args: argparse.Namespace) -> None:
    """The promotion gate on a generated line: a good version (``--epochs``, default layers) is
    LATEST; a deliberately weak one (1 epoch) is gated against it, and so is a second good one
    (another training seed), which must not be held."""
    import tempfile

    from pipeline.demo.synthetic import SyntheticSpec, write_mvtec_dataset
    from pipeline.evaluation import evaluate_model
    from pipeline.mvtec_remote import load_labelled_set
    from pipeline.promotion import compare

    root = tempfile.mkdtemp(prefix="dfr-gate-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # however the run ends
    for seed in range(args.seeds):
        spec = SyntheticSpec((args.line,), 40, args.test, args.test, 128, seed=seed)
        line_dir = write_mvtec_dataset(root + f"/{seed}", spec)[args.line]
        test = load_labelled_set(str(line_dir), SIZE)
        paths = sorted((line_dir / "train" / "good").glob("*.png"))
        normal = np.stack([resize_image(np.asarray(Image.open(p).convert("RGB")), SIZE)
                           for p in paths])  # fmt: skip
        metrics = {}
        for name, epochs, train_seed in (("good", args.epochs, 0), ("weak", 1, 0),
                                         ("good2", args.epochs, 1)):  # fmt: skip
            # the training job's backbone layers (the default), not the tiny drift-test ones
            model, cal, _ = _train(normal[8:], normal[:8], SIZE, epochs, (), train_seed)
            metrics[name] = evaluate_model(model, cal, test, curves=False)
        for name in ("weak", "good2"):
            gate = compare(metrics[name], metrics["good"], "good", args.tolerance)
            m = metrics[name]
            print(f"seed {seed} {name:5s} image AUROC {m['image_auroc']:.3f} (LATEST "
                  f"{metrics['good']['image_auroc']:.3f}), PRO {m['pro']:.3f} (LATEST "
                  f"{metrics['good']['pro']:.3f}): "
                  f"{'promoted' if gate.promote else 'held'}")  # fmt: skip


def _load(paths: list[Path], size: int) -> np.ndarray:
    return load_images(paths, size)


def run_real(args: argparse.Namespace) -> None:
    config = DriftConfig()
    rng = np.random.default_rng(0)
    for root in args.data:
        t0 = time.perf_counter()
        train_paths, test_samples = list_category(Path(root))
        good = list(train_paths)
        rng.shuffle(good)
        train = good[: args.train]
        calib = good[args.train : args.train + args.calib]
        held = good[args.train + args.calib : args.train + args.calib + args.night]
        test_good = [s.image for s in test_samples if s.defect == "good"]
        held += test_good[: max(0, args.night - len(held))]
        defects = [s.image for s in test_samples if s.defect != "good"]
        rng.shuffle(defects)
        defects = defects[: args.night]
        model, cal, ref = _train(
            _load(train, args.size), _load(calib, args.size), args.size, args.epochs, ()
        )
        for kind, paths in (("normal", held), ("defective", defects)):
            rows = rows_of_images(model, cal, _load(paths, args.size))
            d = compute_drift(rows, ref, config, Path(root).name, "2024-01-01", kind, "v")
            print(f"{Path(root).name:14s} {kind:9s} n={d.n_ok:3d} drifted={d.drifted!s:5s} "
                  f"anomaly_rate={d.anomaly_rate:.3f} (expected<={d.expected_rate:.3f}, "
                  f"p={d.anomaly_p:.2g}) score_KS={d.score_ks:.3f} (p={d.score_p:.2g}) "
                  f"brightness_KS={d.brightness_ks:.3f} sharpness_KS={d.sharpness_ks:.3f} "
                  f"reasons={d.reasons or '-'}")  # fmt: skip
        print(f"  ({len(train)} train, {len(calib)} calibration images, default layers, "
              f"size {args.size}, {args.epochs} epochs, "
              f"{time.perf_counter() - t0:.0f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    syn = sub.add_parser("synthetic")
    syn.add_argument("--seeds", type=int, default=10)
    syn.add_argument("--line", default="metal_plate")
    syn.add_argument("--train", type=int, default=40)
    syn.add_argument("--night", type=int, default=60)
    syn.add_argument("--epochs", type=int, default=3)
    syn.add_argument("--verbose", action="store_true")
    real = sub.add_parser("real")
    real.add_argument("--data", action="append", required=True)
    real.add_argument("--train", type=int, default=100)
    real.add_argument("--calib", type=int, default=40)
    real.add_argument("--night", type=int, default=60)
    real.add_argument("--size", type=int, default=256)
    real.add_argument("--epochs", type=int, default=10)
    fb = sub.add_parser("feedback")
    fb.add_argument("--seeds", type=int, default=3)
    fb.add_argument("--line", default="metal_plate")
    fb.add_argument("--train", type=int, default=40)
    fb.add_argument("--feedback", type=int, default=10)
    fb.add_argument("--held-out", type=int, default=30)
    fb.add_argument("--epochs", type=int, default=5)
    gate = sub.add_parser("gate")
    gate.add_argument("--seeds", type=int, default=2)
    gate.add_argument("--line", default="metal_plate")
    gate.add_argument("--epochs", type=int, default=5)
    gate.add_argument("--tolerance", type=float, default=0.02)
    gate.add_argument("--test", type=int, default=10, help="good and defective test images")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modes = {"synthetic": run_synthetic, "real": run_real, "feedback": run_feedback,
             "gate": run_gate}  # fmt: skip
    modes[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
