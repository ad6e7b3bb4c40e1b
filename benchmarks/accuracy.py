"""Accuracy benchmark: train and evaluate DFR on real MVTec-layout datasets.

    python benchmarks/accuracy.py --data ../shared/datasets/magnetic_tile/magnetic_tile \
        --data ../shared/datasets/kolektorsdd/kolektorsdd

Prints one row per dataset and configuration: image AUROC, pixel AUROC, PRO@0.3, F1/IoU at the
calibrated pixel threshold, latent d, epochs, training wall time and inference ms/image on this
machine. Configurations are the defaults plus any --vary option values.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dfr_core.calibrate import calibrate, compute_maps
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import evaluate_outputs
from dfr_core.model import AnomalyOutput, build_extractor
from dfr_core.train import fit, holdout_split


def parse_value(field: str, text: str):
    kind = {
        f.name: f.type for f in dataclasses.fields(ModelConfig) + dataclasses.fields(TrainConfig)
    }
    if field == "layers":
        return tuple(x for x in text.split("+") if x)
    if "int" in str(kind[field]) and text != "None":
        return int(text)
    if "float" in str(kind[field]):
        return float(text)
    return None if text == "None" else text


def variants(args) -> list[dict]:
    """Each --vary field=v1,v2 gives one run per value on top of the defaults."""
    runs = [] if args.skip_defaults else [{}]
    for spec in args.vary:
        field, values = spec.split("=", 1)
        runs += [{field: parse_value(field, v)} for v in values.split(",")]
    return runs


def split_overrides(overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = {k: v for k, v in overrides.items() if k in model_fields}
    t = {k: v for k, v in overrides.items() if k not in model_fields}
    return ModelConfig(**m), TrainConfig(**t)


def load_data(root: Path, size: int, cache: dict, max_train: int | None):
    if (root, size) not in cache:
        train_paths, test_samples = list_category(root)
        cache[(root, size)] = (load_images(train_paths, size), load_test(test_samples, size))
    train_all, test = cache[(root, size)]
    return (train_all[:max_train] if max_train else train_all), test


def evaluate_row(model, cal_images, test, sigma: float, per_type: bool) -> dict:
    """Calibrate and evaluate the trained model with smoothing sigma (no retraining needed)."""
    model.head.config = dataclasses.replace(model.head.config, smoothing_sigma=sigma)
    cal = calibrate(model, cal_images, CalibrationConfig())
    t0 = time.perf_counter()
    out = compute_maps(model, test.images)
    ms = 1000.0 * (time.perf_counter() - t0) / len(test.images)
    ev = evaluate_outputs(out, test.masks, test.labels, cal, ms)
    types = {}
    for kind in sorted(set(test.defects) - {"good"}) if per_type else []:
        sel = torch.from_numpy(np.array([d in ("good", kind) for d in test.defects]))
        sub_out = AnomalyOutput(out.anomaly_map[sel], out.score[sel])
        sub = evaluate_outputs(sub_out, test.masks[sel.numpy()], test.labels[sel.numpy()], cal)
        types[kind] = (sub.image_auroc, sub.pixel_auroc, sub.pro)
    return {"ev": ev, "per_type": types}


def run_one(root: Path, overrides: dict, cache: dict, args) -> Iterator[dict]:
    """Train once with `overrides`; evaluate at each --sigmas value (default: the config's)."""
    mcfg, tcfg = split_overrides(overrides)
    train_all, test = load_data(root, mcfg.image_size, cache, args.max_train)
    tr, va = holdout_split(len(train_all), tcfg.val_fraction, tcfg.seed)
    torch.manual_seed(tcfg.seed)
    t0 = time.perf_counter()

    def progress(s) -> None:
        if args.verbose:
            print(
                f"  epoch {s.epoch}/{s.epochs} train {s.train_loss:.4f} val {s.val_loss}",
                file=sys.stderr,
                flush=True,
            )

    result = fit(build_extractor(mcfg), mcfg, tcfg, train_all[tr], train_all[va], progress=progress)
    fit_s = time.perf_counter() - t0
    for sigma in args.sigmas or [mcfg.smoothing_sigma]:
        r = evaluate_row(result.model, train_all[va], test, sigma, args.per_type)
        cfg = dict(overrides)
        if args.sigmas:
            cfg["smoothing_sigma"] = sigma
        yield {
            **r,
            "config": cfg or {"defaults": True},
            "summary": result.summary,
            "fit_s": fit_s,
            "train_images": len(tr),
        }


def print_row(root: Path, r: dict) -> None:
    ev, s = r["ev"], r["summary"]
    cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
    print(
        f"| {root.name} | {cfg} | {fmt(ev.image_auroc)} | {fmt(ev.pixel_auroc)} | "
        f"{fmt(ev.pro)} | {fmt(ev.f1)} | {fmt(ev.iou)} | {s['channels']} | {s['latent_dim']} | "
        f"{s['epochs_run']} | {r['train_images']} | {r['fit_s']:.0f} | {ev.ms_per_image:.0f} |",
        flush=True,
    )
    for kind, (ia, pa, pro) in r["per_type"].items():
        print(f"|   {kind} | | {fmt(ia)} | {fmt(pa)} | {fmt(pro)} | | | | | | | | |", flush=True)


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True, help="an MVTec-layout category root")
    ap.add_argument(
        "--vary", action="append", default=[], help="field=v1,v2 (ModelConfig/TrainConfig field)"
    )
    ap.add_argument(
        "--max-train", type=int, default=None, help="cap on training images (quick runs)"
    )
    ap.add_argument("--per-type", action="store_true", help="also print metrics per defect type")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--sigmas",
        type=float,
        nargs="*",
        default=None,
        help="evaluate each trained model at these smoothing sigmas (no retraining)",
    )
    ap.add_argument("--skip-defaults", action="store_true", help="only the --vary runs")
    ap.add_argument("--verbose", action="store_true", help="per-epoch losses on stderr")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, defaults: "
        f"{ModelConfig()} {TrainConfig()}",
        flush=True,
    )
    header = (
        "| dataset | config | image AUROC | pixel AUROC | PRO@0.3 | F1 | IoU | C | d | epochs "
        "| train imgs | fit s | ms/img |"
    )
    print(header + "\n|" + "---|" * 13, flush=True)
    for root in map(Path, args.data):
        cache: dict = {}
        for overrides in variants(args):
            for row in run_one(root, overrides, cache, args):
                print_row(root, row)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    main()
