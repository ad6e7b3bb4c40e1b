"""bf16 and int8 against fp32 on real data: the reduced-precision paths' parity figures (issue 13).

    python benchmarks/precision_parity.py \\
        --data ../shared/datasets/magnetic_tile/magnetic_tile \\
        --data ../shared/datasets/kolektorsdd/kolektorsdd
    python benchmarks/precision_parity.py --global-weight 0 --data ...  # no global term

Per dataset: one model with the defaults (``--max-train`` / ``--epochs`` shrink the training, which
only sets the weights both precisions then share), trained at fp32 on the training slice of
`dfr_core.train.holdout_splits`. Then, for each precision in turn (fp32; bf16 as
`dfr_core.calibrate.calibrate` records it by default, i.e. on an fp32 backbone; bf16 with a bf16
backbone too, "bf16-all"; int8, the head's products in int8 (`dfr_core.quantized`), on an fp32
backbone by default, and on a bf16 one, "int8-bf16"), the
thresholds are calibrated at that
precision on the calibration slice (`dfr_core.calibrate.calibrate`, as ``train`` does), and the
test split is scored through the shared batched forward at that precision
(`dfr_core.calibrate.compute_maps`: the scoring actor's computation). Printed: image and
pixel AUROC and PRO per precision, their differences (the issue's criterion: AUROC within 0.002),
the largest relative change of maps and image scores, the change of the two thresholds, and how
many test images change their anomaly decision at the calibrated image threshold.

``--global-weight 0`` trains the model without the score's global term, as the paper's
configuration scores (the speed benchmark's model). A precision whose spec equals an earlier
row's is not repeated.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dfr_core.calibrate import calibrate, compute_maps
from dfr_core.config import ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import evaluate_outputs
from dfr_core.model import build_extractor
from dfr_core.train import fit, holdout_splits

#: (label, head precision, backbone precision or None for calibrate's default)
PRECISIONS = (
    ("fp32", "fp32", None),
    ("bf16", "bf16", None),
    ("bf16-all", "bf16", "bf16"),
    ("int8", "int8", None),
    ("int8-bf16", "int8", "bf16"),
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _diff_row(dataset: str, name: str, ref: tuple, low: tuple) -> str:
    """One reduced precision against fp32: metric deltas, largest changes, threshold moves."""
    (c32, o32, e32), (c16, o16, e16) = ref, low
    flags32 = o32.score.numpy() > c32.image_threshold
    flags16 = o16.score.numpy() > c16.image_threshold
    # the pixel threshold is a raw map value (relative change); the image threshold is on the
    # normalised score scale (0 = q90 of normal images, 1 = q99.5), so its change is absolute
    pixel_thr = abs(c16.pixel_threshold / c32.pixel_threshold - 1)
    image_thr = c16.image_threshold - c32.image_threshold
    return (
        f"| {dataset} | {name} - fp32 | {e16.image_auroc - e32.image_auroc:+.4f} | "
        f"{e16.pixel_auroc - e32.pixel_auroc:+.4f} | {e16.pro - e32.pro:+.4f} | "
        f"maps {_rel(o16.anomaly_map, o32.anomaly_map):.1e}, scores "
        f"{_rel(o16.score, o32.score):.1e} (max rel. change); pixel threshold {pixel_thr:.1e} "
        f"(rel.), image threshold {image_thr:+.1e} (normalised units); "
        f"decisions changed {int((flags32 != flags16).sum())} of {len(flags32)}; |"
    )


def run(root: Path, args: argparse.Namespace) -> list[str]:
    """Train once; calibrate and score at each precision; the dataset's table rows."""
    mcfg = _model_config(args)
    tcfg = TrainConfig() if args.epochs is None else TrainConfig(epochs=args.epochs)
    train_paths, samples = list_category(root)
    train_all = load_images(train_paths[: args.max_train], mcfg.image_size)
    test = load_test(samples, mcfg.image_size)
    split = holdout_splits(len(train_all), tcfg.val_fraction, tcfg.calib_fraction, tcfg.seed)
    torch.manual_seed(tcfg.seed)
    t0 = time.perf_counter()
    model = fit(
        build_extractor(mcfg), mcfg, tcfg, train_all[split.train], train_all[split.early_stopping]
    ).model.eval()
    fit_s = time.perf_counter() - t0
    cpu = torch.device("cpu")
    res = {}
    for name, head, backbone in PRECISIONS:
        cal = calibrate(model, train_all[split.calibration], precision=head, backbone=backbone)
        spec = cal.precision_spec
        if any(spec == seen.precision_spec for seen, _, _ in res.values()):
            continue  # the same computation as an earlier row
        t0 = time.perf_counter()
        out = compute_maps(model, test.images, cpu, precision=spec)
        ms = 1000 * (time.perf_counter() - t0) / len(test.images)
        res[name] = (cal, out, evaluate_outputs(out, test.masks, test.labels, cal, ms))
    rows = []
    for name, (cal, _, ev) in res.items():
        rows.append(
            f"| {root.name} | {name}: {cal.precision_spec.describe()} | {ev.image_auroc:.4f} | "
            f"{ev.pixel_auroc:.4f} | {ev.pro:.4f} | {ev.ms_per_image:.0f} |"
        )
    for name in list(res)[1:]:
        rows.append(_diff_row(root.name, name, res["fp32"], res[name]))
    rows[-1] = rows[-1][:-1] + f"{len(split.train)} training images, fit {fit_s:.0f} s |"
    return rows


def _model_config(args: argparse.Namespace) -> ModelConfig:
    if args.global_weight is None:
        return ModelConfig()
    return ModelConfig(global_weight=args.global_weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", required=True, help="an MVTec-layout category root")
    ap.add_argument("--max-train", type=int, default=None, help="cap on training images")
    ap.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    ap.add_argument(
        "--global-weight", type=float, default=None, help="default: ModelConfig's (0: none)"
    )
    args = ap.parse_args()
    tcfg = TrainConfig() if args.epochs is None else TrainConfig(epochs=args.epochs)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{_model_config(args)}; epochs {tcfg.epochs}; max train {args.max_train}",
        flush=True,
    )
    print("| dataset | precision | image AUROC | pixel AUROC | PRO@0.3 | ms/img (test) |")
    print("|---|---|---|---|---|---|")
    for root in args.data:
        for row in run(Path(root), args):
            print(row, flush=True)


if __name__ == "__main__":
    main()
