"""Accuracy benchmark: train and evaluate DFR on real MVTec-layout datasets.

    python benchmarks/accuracy.py --data ../shared/datasets/magnetic_tile/magnetic_tile \\
        --score-variants --per-type

Protocol: the normal training images are split three ways (dfr_core.train.holdout_splits):
training, an early-stopping slice (validation loss; also the score terms' scales) and a disjoint
calibration slice (thresholds only). One row per dataset and configuration: image AUROC, pixel
AUROC, PRO@0.3, image TPR at 1 % image FPR, the realised image FPR / recall of the calibrated
image threshold on the test split, mask F1 / IoU at the calibrated pixel threshold, latent d,
epochs, fit time, ms/image, model size (head.pt + model.json).

Configurations: the defaults, plus one retrained model per --vary value; with --score-variants
each trained model is also scored with each alternative image-score / smoothing / pixel-FPR
setting of SCORE_VARIANTS, from cached features (no retraining: only the head runs again and
the score scales and thresholds are refitted on the same held-out slices).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dfr_core.artifact import save_model
from dfr_core.calibrate import calibrate_outputs
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import EvalResult, evaluate_outputs
from dfr_core.model import AnomalyOutput, DFRModel, build_extractor, concat_outputs
from dfr_core.train import feature_batches, fit, fit_score_scales, holdout_splits

#: Alternatives scored on the defaults' model: (label, ModelConfig changes, CalibrationConfig).
SCORE_VARIANTS: tuple[tuple[str, dict, dict], ...] = (
    ("paper score: max, raw, sigma 0", {"smoothing_sigma": 0.0, "image_score": "max",
                                        "score_norm": "none", "global_weight": 0.0}, {}),
    ("max, raw, sigma 4 (old default)", {"smoothing_sigma": 4.0, "image_score": "max",
                                         "score_norm": "none", "global_weight": 0.0}, {}),
    ("max, raw", {"image_score": "max", "score_norm": "none", "global_weight": 0.0}, {}),
    ("top 0.1 %, raw", {"topk_fraction": 0.001, "score_norm": "none", "global_weight": 0.0}, {}),
    ("top 1 %, raw", {"topk_fraction": 0.01, "score_norm": "none", "global_weight": 0.0}, {}),
    ("top 5 %, raw", {"topk_fraction": 0.05, "score_norm": "none", "global_weight": 0.0}, {}),
    ("top 1 %, normalised, no global", {"topk_fraction": 0.01, "global_weight": 0.0}, {}),
    ("global term only (weight 1000)", {"global_weight": 1000.0}, {}),
    ("global weight 0.5", {"global_weight": 0.5}, {}),
    ("global weight 1", {"global_weight": 1.0}, {}),
    ("global weight 2", {"global_weight": 2.0}, {}),
    ("sigma 0", {"smoothing_sigma": 0.0}, {}),
    ("sigma 4", {"smoothing_sigma": 4.0}, {}),
    ("sigma 8", {"smoothing_sigma": 8.0}, {}),
    ("sigma 16", {"smoothing_sigma": 16.0}, {}),
    ("pixel FPR 0.01", {}, {"pixel_fpr": 0.01}),
    ("pixel FPR 0.02", {}, {"pixel_fpr": 0.02}),
)  # fmt: skip

HEADER = (
    "| dataset | config | image AUROC | pixel AUROC | PRO@0.3 | TPR@1%FPR | real. FPR | "
    "real. recall | mask F1 | mask IoU | d | epochs | fit s | ms/img | model KB |"
)


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


class Cached:
    """Features of one image set, fp16 on the CPU, so heads can be rerun without the backbone."""

    def __init__(self, model: DFRModel, images: np.ndarray) -> None:
        t0 = time.perf_counter()
        cpu = torch.device("cpu")
        self.feats = [f.half() for f in feature_batches(model.extractor, images, 8, cpu)]
        self.backbone_s = time.perf_counter() - t0
        self.n = len(images)

    def batches(self):
        return (f.float() for f in self.feats)

    @torch.no_grad()
    def outputs(self, model: DFRModel) -> AnomalyOutput:
        return concat_outputs([model.head(f) for f in self.batches()])


def model_kb(model: DFRModel, calibration) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp, calibration)
        return sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1024


def score(model: DFRModel, sets: dict[str, Cached], test, cal_cfg, per_type: bool):
    """Refit the score scales on the early-stopping slice, calibrate on the calibration slice,
    evaluate on the test split: (EvalResult, per-type AUROCs, calibration)."""
    fit_score_scales(model.head, sets["es"].batches())
    cal = calibrate_outputs(sets["cal"].outputs(model), cal_cfg)
    t0 = time.perf_counter()
    out = sets["test"].outputs(model)
    ms = (sets["test"].backbone_s + time.perf_counter() - t0) * 1000 / sets["test"].n
    ev = evaluate_outputs(out, test.masks, test.labels, cal, ms)
    types = {}
    for kind in sorted(set(test.defects) - {"good"}) if per_type else []:
        sel = np.array([d in ("good", kind) for d in test.defects])
        sub = AnomalyOutput(out.anomaly_map[sel], out.score[sel], out.max_score[sel])
        r = evaluate_outputs(sub, test.masks[sel], test.labels[sel], cal)
        types[kind] = (r.image_auroc, r.pixel_auroc, r.pro)
    return ev, types, cal


def run_one(root: Path, overrides: dict, cache: dict, args) -> None:
    """Train once with `overrides`; print its row (and the score variants' rows)."""
    mcfg, tcfg = split_overrides(overrides)
    train_all, test = load_data(root, mcfg.image_size, cache, args.max_train)
    split = holdout_splits(len(train_all), tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed)
    torch.manual_seed(tcfg.seed)
    t0 = time.perf_counter()

    def progress(s) -> None:
        if args.verbose:
            print(f"  epoch {s.epoch} train {s.train_loss:.4f} val {s.val_loss}", file=sys.stderr)

    result = fit(
        build_extractor(mcfg), mcfg, tcfg, train_all[split.train],
        train_all[split.early_stopping], progress=progress,
    )  # fmt: skip
    fit_s = time.perf_counter() - t0
    model = result.model.eval()
    sets = {
        "es": Cached(model, train_all[split.early_stopping]),
        "cal": Cached(model, train_all[split.calibration]),
        "test": Cached(model, test.images),
    }
    label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
    ev, types, cal = score(model, sets, test, CalibrationConfig(), args.per_type)
    info = (result.summary, fit_s, model_kb(model, cal))
    print_row(root, label, ev, types, info)
    if args.score_variants:
        base = model.head.config
        for name, changes, cal_changes in SCORE_VARIANTS:
            model.head.config = dataclasses.replace(base, **changes)
            ev, types, _ = score(model, sets, test, CalibrationConfig(**cal_changes), False)
            print_row(root, name, ev, types, info)
        model.head.config = base
    print(
        f"<!-- {root.name} {label}: split train/early-stop/calibration = {len(split.train)}/"
        f"{len(split.early_stopping)}/{len(split.calibration)}, best epoch "
        f"{result.summary['best_epoch']}, score terms {result.summary['score_terms']} -->",
        flush=True,
    )


def fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_row(root: Path, label: str, ev: EvalResult, types: dict, info) -> None:
    summary, fit_s, kb = info
    print(
        f"| {root.name} | {label} | {fmt(ev.image_auroc)} | {fmt(ev.pixel_auroc)} | "
        f"{fmt(ev.pro)} | {fmt(ev.tpr_at_1pct_fpr)} | {fmt(ev.realised_image_fpr)} | "
        f"{fmt(ev.realised_image_recall)} | {fmt(ev.f1)} | {fmt(ev.iou)} | "
        f"{summary['latent_dim']} | {summary['epochs_run']} | {fit_s:.0f} | "
        f"{ev.ms_per_image:.0f} | {kb:.0f} |",
        flush=True,
    )
    for kind, (ia, pa, pro) in types.items():
        print(f"|   {kind} | | {fmt(ia)} | {fmt(pa)} | {fmt(pro)} |" + " |" * 10, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True, help="an MVTec-layout category root")
    ap.add_argument(
        "--vary", action="append", default=[], help="field=v1,v2 (ModelConfig/TrainConfig field)"
    )
    ap.add_argument("--max-train", type=int, default=None, help="cap on training images")
    ap.add_argument("--per-type", action="store_true", help="also print metrics per defect type")
    ap.add_argument("--score-variants", action="store_true", help="score SCORE_VARIANTS too")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-defaults", action="store_true", help="only the --vary runs")
    ap.add_argument("--verbose", action="store_true", help="per-epoch losses on stderr")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, defaults: "
        f"{ModelConfig()} {TrainConfig()} {CalibrationConfig()}",
        flush=True,
    )
    print(HEADER + "\n|" + "---|" * 15, flush=True)
    for root in map(Path, args.data):
        cache: dict = {}
        for overrides in variants(args):
            run_one(root, overrides, cache, args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB")


if __name__ == "__main__":
    main()
