"""Screen the retraining levers (layers, schedule, backbone) from one cached feature superset.

    python benchmarks/accuracy_levers.py --data ../shared/datasets/magnetic_tile/magnetic_tile \\
        --backbone mobilenet_v2 --superset features.1+features.3+features.6+features.10+\\
features.13+features.16 --run "layers=features.1+features.3+features.6+features.10+features.13"

The backbone runs once per dataset over a superset of layers; the features (fp16, every grid
position) are cached under --cache. A layer subset's channels are a slice of the superset's (the
extractor concatenates layers in backbone order, each pooled on its own), so each --run trains a
head with `dfr_core.train.fit_head` on exactly the features `fit` would have extracted for those
layers, then fits the global term and score scales on the early-stopping slice and calibrates on
the disjoint calibration slice, as `benchmarks/accuracy.py` does. Rows have accuracy.py's columns;
the final figures come from accuracy.py itself (the real `fit` path).

Each --run is "field=value;field=value" over ModelConfig / TrainConfig / CalibrationConfig fields
(layers '+'-separated; backbone and image_size must match the cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.accuracy import HEADER, parse_value, print_row
from dfr_core import metrics
from dfr_core.backbones import backbone_info
from dfr_core.calibrate import calibrate_outputs
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category, load_images, load_test
from dfr_core.evaluate import evaluate_outputs
from dfr_core.model import AnomalyOutput, build_extractor, concat_outputs
from dfr_core.train import (
    feature_batches,
    fit_global_term,
    fit_head,
    fit_score_scales,
    holdout_splits,
    subsample_positions,
)


def extract(extractor, images: np.ndarray) -> torch.Tensor:
    """(N, C, G, G) fp16 features of every image."""
    cpu = torch.device("cpu")
    return torch.cat([f.half() for f in feature_batches(extractor, images, 8, cpu)])


def load_cache(args, root: Path, superset: tuple[str, ...]) -> dict:
    """Superset features of the train / early-stop / calibration / test images (cached)."""
    tag = f"{root.name}_{args.backbone}_{args.size}_{'+'.join(superset)}_{args.max_train}.pt"
    path = Path(args.cache) / tag
    if path.exists():
        return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    train_paths, test_samples = list_category(root)
    train_all = load_images(train_paths, args.size)
    if args.max_train:
        train_all = train_all[: args.max_train]
    test = load_test(test_samples, args.size)
    cfg = TrainConfig()
    split = holdout_splits(len(train_all), cfg.val_fraction, cfg.calib_fraction, cfg.seed)
    mcfg = ModelConfig(backbone=args.backbone, layers=superset, image_size=args.size)
    extractor = build_extractor(mcfg).eval()
    data = {
        part: extract(extractor, train_all[idx])
        for part, idx in (
            ("train", split.train),
            ("es", split.early_stopping),
            ("cal", split.calibration),
        )
    }
    t_feat = time.perf_counter() - t0
    data["test"] = extract(extractor, test.images)
    data["masks"] = torch.from_numpy(np.asarray(test.masks).astype(bool))
    data["labels"] = torch.from_numpy(np.asarray(test.labels))
    data["defects"] = list(test.defects)
    data["feature_seconds"] = t_feat
    data["ms_per_image"] = (time.perf_counter() - t0 - t_feat) * 1000 / len(test.images)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def channel_slice(backbone: str, superset: tuple[str, ...], layers: tuple[str, ...]):
    """Indices of `layers`' channels inside the superset's concatenation."""
    channels = {layer.name: layer.channels for layer in backbone_info(backbone).layers}
    starts, pos = {}, 0
    for name in superset:
        starts[name] = pos
        pos += channels[name]
    if list(layers) != [n for n in superset if n in layers]:
        raise SystemExit(f"layers {layers} are not an ordered subset of the superset {superset}")
    return torch.cat([torch.arange(starts[n], starts[n] + channels[n]) for n in layers])


def parse_run(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(";")):
        field, value = item.split("=", 1)
        if field in {f.name for f in dataclasses.fields(CalibrationConfig)}:
            out[field] = float(value)
        else:
            out[field] = parse_value(field, value)
    return out


def configs(args, overrides: dict):
    fields = {k: {f.name for f in dataclasses.fields(c)} for k, c in (
        ("m", ModelConfig), ("t", TrainConfig), ("c", CalibrationConfig))}  # fmt: skip
    base = {"backbone": args.backbone, "image_size": args.size}
    m = {**base, **{k: v for k, v in overrides.items() if k in fields["m"]}}
    t = {k: v for k, v in overrides.items() if k in fields["t"]}
    c = {k: v for k, v in overrides.items() if k in fields["c"]}
    return ModelConfig(**m), TrainConfig(**t), CalibrationConfig(**c)


def head_outputs(head, feats: torch.Tensor, idx: torch.Tensor) -> AnomalyOutput:
    with torch.no_grad():
        return concat_outputs([head(f[:, idx].float()) for f in feats.split(8)])


def run(args, root: Path, data: dict, superset, text: str) -> None:
    mcfg, tcfg, ccfg = configs(args, parse_run(text))
    layers = mcfg.layers or backbone_info(args.backbone).default_layers
    idx = channel_slice(args.backbone, superset, layers)
    cpu = torch.device("cpu")
    t0 = time.perf_counter()
    bank = data["train"][: args.screen_train or None, idx].flatten(2)
    val_bank = subsample_positions(data["es"][:, idx].flatten(2), tcfg.val_positions, tcfg.seed)

    def progress(s) -> None:
        if args.verbose:
            print(f"  epoch {s.epoch} train {s.train_loss:.4f} val {s.val_loss}", file=sys.stderr)

    torch.manual_seed(tcfg.seed)
    fitted = fit_head(mcfg, tcfg, bank, val_bank, cpu, progress)
    head = fitted.head
    # the global Gaussian always on the whole training split (cheap: pooled means), so that a
    # --screen-train CAE still has the product's global term
    fit_global_term(head, data["train"][:, idx].flatten(2), cpu)
    fit_score_scales(head, (f[:, idx].float() for f in data["es"].split(8)))
    fit_s = time.perf_counter() - t0 + data["feature_seconds"] * len(idx) / data["train"].shape[1]
    cal_out = head_outputs(head, data["cal"], idx)
    t_head = time.perf_counter()
    out = head_outputs(head, data["test"], idx)
    # backbone (measured at caching, superset layers) + this head, per test image
    ms_image = data["ms_per_image"] + (time.perf_counter() - t_head) * 1000 / len(out.score)
    masks, labels = data["masks"].numpy(), data["labels"].numpy()
    variants = [("", {}, {})] + [
        (f" | {v}", parse_run(v), {}) for v in args.rescore
    ]  # rescoring variants: score / smoothing / calibration fields, no retraining
    base_cfg, base_ev = head.config, None
    for suffix, changes, _ in variants:
        m_changes = {k: v for k, v in changes.items() if hasattr(base_cfg, k)}
        c_changes = {k: v for k, v in changes.items() if not hasattr(base_cfg, k)}
        head.config = dataclasses.replace(base_cfg, **m_changes)
        if m_changes:
            fit_score_scales(head, (f[:, idx].float() for f in data["es"].split(8)))
            cal_o = head_outputs(head, data["cal"], idx)
            test_o = head_outputs(head, data["test"], idx)
        else:
            cal_o, test_o = cal_out, out
        cal = calibrate_outputs(cal_o, dataclasses.replace(ccfg, **c_changes))
        if m_changes or not suffix:
            ev = evaluate_outputs(test_o, masks, labels, cal, ms_image)
            base_ev = ev if not suffix else base_ev
        else:  # thresholds only: the ranking metrics are the base row's
            tm = metrics.threshold_metrics(masks, test_o.anomaly_map.numpy(), cal.pixel_threshold)
            op = metrics.image_operating_point(labels, test_o.score.numpy(), cal.image_threshold)
            ev = base_ev._replace(
                f1=tm.f1, iou=tm.iou, realised_image_fpr=op.fpr, realised_image_recall=op.recall
            )
        types = {}
        for kind in sorted(set(data["defects"]) - {"good"}) if args.per_type and not suffix else []:
            sel = np.array([d in ("good", kind) for d in data["defects"]])
            sub = AnomalyOutput(test_o.anomaly_map[sel], test_o.score[sel], test_o.max_score[sel])
            r = evaluate_outputs(sub, masks[sel], labels[sel], cal)
            types[kind] = (r.image_auroc, r.pixel_auroc, r.pro)
        summary = {"latent_dim": fitted.latent_dim, "epochs_run": len(fitted.history)}
        kb = sum(t.numel() * t.element_size() for t in head.state_dict().values()) / 1024
        print_row(root, (text or "defaults") + suffix, ev, types, (summary, fit_s, kb))
        print(mask_detail(test_o, masks, cal), flush=True)
    head.config = base_cfg
    print(f"<!-- best epoch {fitted.best_epoch} of {len(fitted.history)} -->", flush=True)


def mask_detail(out: AnomalyOutput, masks: np.ndarray, cal) -> str:
    """Mask precision / recall at the calibrated pixel threshold, and F1 / IoU when masks are
    kept only on images the calibrated image threshold flags ("gated": a good image that is
    not flagged gets no outline)."""
    maps = out.anomaly_map.numpy()
    tm = metrics.threshold_metrics(masks, maps, cal.pixel_threshold)
    flagged = out.score.numpy() > cal.image_threshold
    gated = metrics.threshold_metrics(masks, maps * flagged[:, None, None], cal.pixel_threshold)
    return (
        f"<!-- mask precision {tm.precision:.3f} recall {tm.recall:.3f} pixel FPR {tm.fpr:.4f}; "
        f"gated by the image flag: F1 {gated.f1:.3f} IoU {gated.iou:.3f} "
        f"(precision {gated.precision:.3f} recall {gated.recall:.3f}) -->"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="an MVTec-layout category root")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--superset", required=True, help="'+'-separated layers, backbone order")
    ap.add_argument("--run", action="append", default=[], help="field=v;field=v (one head each)")
    ap.add_argument("--rescore", action="append", default=[], help="field=v;... rescoring only")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument(
        "--screen-train", type=int, default=None, help="train on the first N of the train split"
    )
    ap.add_argument("--cache", default="/tmp/acc/cache")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-type", action="store_true")
    ap.add_argument("--cache-only", action="store_true", help="extract and cache, no runs")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.data)
    superset = tuple(x for x in args.superset.split("+") if x)
    t0 = time.perf_counter()
    data = load_cache(args, root, superset)
    print(
        f"features of {root.name} ({args.backbone}, {superset}): train/es/cal/test = "
        f"{len(data['train'])}/{len(data['es'])}/{len(data['cal'])}/{len(data['test'])}, "
        f"{time.perf_counter() - t0:.0f} s; defaults {TrainConfig()} {CalibrationConfig()}",
        flush=True,
    )
    if args.cache_only:
        return
    print(HEADER + "\n|" + "---|" * 15, flush=True)
    for text in args.run or [""]:
        run(args, root, data, superset, text)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB (the whole process, cached test features included)")


if __name__ == "__main__":
    main()
