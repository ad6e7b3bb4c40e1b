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
import time
from pathlib import Path

import numpy as np
import torch

from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import evaluate
from dfr_core.model import build_extractor
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
    runs = [{}]
    for spec in args.vary:
        field, values = spec.split("=", 1)
        runs += [{field: parse_value(field, v)} for v in values.split(",")]
    return runs


def split_overrides(overrides: dict) -> tuple[ModelConfig, TrainConfig]:
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    m = {k: v for k, v in overrides.items() if k in model_fields}
    t = {k: v for k, v in overrides.items() if k not in model_fields}
    return ModelConfig(**m), TrainConfig(**t)


def run_one(root: Path, overrides: dict, data_cache: dict, max_train: int | None) -> dict:
    mcfg, tcfg = split_overrides(overrides)
    key = (root, mcfg.image_size)
    if key not in data_cache:
        train_paths, test_samples = list_category(root)
        data_cache[key] = (
            load_images(train_paths, mcfg.image_size),
            load_test(test_samples, mcfg.image_size),
        )
    train_all, test = data_cache[key]
    if max_train:
        train_all = train_all[:max_train]
    tr, va = holdout_split(len(train_all), tcfg.val_fraction, tcfg.seed)
    torch.manual_seed(tcfg.seed)
    t0 = time.perf_counter()
    extractor = build_extractor(mcfg)
    result = fit(extractor, mcfg, tcfg, train_all[tr], train_all[va])
    cal = calibrate(result.model, train_all[va], CalibrationConfig())
    fit_s = time.perf_counter() - t0
    ev = evaluate(result.model, test.images, test.masks, test.labels, cal)
    per_type = {}
    for kind in sorted(set(test.defects) - {"good"}):
        sel = np.array([d in ("good", kind) for d in test.defects])
        sub = evaluate(result.model, test.images[sel], test.masks[sel], test.labels[sel], cal)
        per_type[kind] = (sub.image_auroc, sub.pixel_auroc, sub.pro)
    return {
        "config": overrides or {"defaults": True},
        "image_auroc": ev.image_auroc,
        "pixel_auroc": ev.pixel_auroc,
        "pro": ev.pro,
        "f1": ev.f1,
        "iou": ev.iou,
        "latent_d": result.summary["latent_dim"],
        "channels": result.summary["channels"],
        "epochs": result.summary["epochs_run"],
        "train_images": len(tr),
        "fit_s": fit_s,
        "ms_per_image": ev.ms_per_image,
        "per_type": per_type,
    }


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
            r = run_one(root, overrides, cache, args.max_train)
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items())
            print(
                f"| {root.name} | {cfg} | {fmt(r['image_auroc'])} | {fmt(r['pixel_auroc'])} | "
                f"{fmt(r['pro'])} | {fmt(r['f1'])} | {fmt(r['iou'])} | {r['channels']} | "
                f"{r['latent_d']} | {r['epochs']} | {r['train_images']} | {r['fit_s']:.0f} | "
                f"{r['ms_per_image']:.0f} |",
                flush=True,
            )
            if args.per_type:
                for kind, (ia, pa, pro) in r["per_type"].items():
                    print(
                        f"|   {kind} | | {fmt(ia)} | {fmt(pa)} | {fmt(pro)} | | | | | | | | |",
                        flush=True,
                    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    main()
