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
(layers '+'-separated; backbone and image_size must match the cache). A trained head is saved
under --heads and reused by a later --run of the same text, dataset and training subset, so
rescoring needs no retraining. Each --rescore rescores every run's head with other score /
smoothing / calibration fields (the score scales and thresholds are refitted on the same held-out
slices); `map_global=W` (benchmark only, not a model option) adds W x the image's normalised
global term to its locally normalised map.
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
from dfr_core.evaluate import EvalResult, evaluate_outputs
from dfr_core.model import AnomalyOutput, DFRHead, build_extractor, concat_outputs
from dfr_core.scoring import mahalanobis, normalise
from dfr_core.train import (
    HeadFit,
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
        if field == "map_global" or field in {
            f.name for f in dataclasses.fields(CalibrationConfig)
        }:
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


#: ModelConfig fields that change only the image score, never the map: a --rescore of these
#: alone keeps the base row's pixel metrics (pixel AUROC, PRO, masks) and recomputes the rest.
IMAGE_SCORE_FIELDS = frozenset({"image_score", "topk_fraction", "score_norm", "global_weight"})


def trained_head(args, root: Path, data: dict, superset, text: str, mcfg, tcfg, idx):
    """fit_head on the cached bank, or the head a previous run saved under --heads (same
    dataset, backbone, superset, run text and training subset: the same weights)."""
    key = f"{root.name}_{args.backbone}_{'+'.join(superset)}_{text}_{args.screen_train}"
    path = Path(args.heads) / (key.replace("/", "_").replace(";", ",") + ".pt")
    bank = data["train"][: args.screen_train or None, idx].flatten(2)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        head = DFRHead(mcfg, bank.shape[1], saved["fit"]["latent_dim"])
        head.load_state_dict(saved["state"])
        print(f"<!-- head loaded from {path} (trained in {saved['train_s']:.0f} s) -->")
        return HeadFit(head.eval(), **saved["fit"]), saved["train_s"]
    t0 = time.perf_counter()
    val_bank = subsample_positions(data["es"][:, idx].flatten(2), tcfg.val_positions, tcfg.seed)

    def progress(s) -> None:
        if args.verbose:
            print(f"  epoch {s.epoch} train {s.train_loss:.4f} val {s.val_loss}", file=sys.stderr)

    torch.manual_seed(tcfg.seed)
    fitted = fit_head(mcfg, tcfg, bank, val_bank, torch.device("cpu"), progress)
    train_s = time.perf_counter() - t0
    Path(args.heads).mkdir(parents=True, exist_ok=True)
    fit_fields = {k: v for k, v in fitted._asdict().items() if k != "head"}
    torch.save({"state": fitted.head.state_dict(), "fit": fit_fields, "train_s": train_s}, path)
    return fitted, train_s


def global_normalised(head, feats: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(N,) each image's global term, normalised by the head's stored global scale."""
    with torch.no_grad():
        pooled = torch.cat([f[:, idx].float().mean(dim=(2, 3)) for f in feats.split(8)])
        z = head.pooled_standardized(pooled)
        return normalise(mahalanobis(z, head.global_mean, head.global_precision), head.global_scale)


def map_with_global(head, out: AnomalyOutput, feats, idx, weight: float) -> AnomalyOutput:
    """Benchmark-only map variant (aimed at large low-contrast defects): the map normalised by
    the local term's scale plus `weight` x the image's normalised global term, so every pixel
    of an image far from the normal images' pooled features is raised. Scores unchanged."""
    if head.config.global_weight <= 0 or head.config.score_norm != "quantile":
        raise SystemExit("map_global needs a head with a global term and score_norm=quantile")
    lo, hi = head.local_scale
    g = global_normalised(head, feats, idx)
    amap = (out.anomaly_map - lo) / (hi - lo) + weight * g[:, None, None]
    return AnomalyOutput(amap, out.score, out.max_score)


def image_only(base: EvalResult, out: AnomalyOutput, labels: np.ndarray, cal) -> EvalResult:
    """The base row with the image-level metrics of other scores (the maps are the base's)."""
    scores = out.score.numpy()
    op = metrics.image_operating_point(labels, scores, cal.image_threshold)
    return base._replace(
        image_auroc=metrics.image_auroc(labels, scores),
        tpr_at_1pct_fpr=metrics.tpr_at_fpr(labels, scores, 0.01),
        realised_image_fpr=op.fpr,
        realised_image_recall=op.recall,
    )


def per_type(data: dict, out: AnomalyOutput, labels: np.ndarray, cal, base: dict | None) -> dict:
    """(image AUROC, pixel AUROC, PRO) of each defect type against all good test images; with
    `base` (the base row's, same maps) only the image AUROC is recomputed."""
    masks, types = data["masks"].numpy(), {}
    for kind in sorted(set(data["defects"]) - {"good"}):
        sel = np.array([d in ("good", kind) for d in data["defects"]])
        if base is not None:
            types[kind] = (metrics.image_auroc(labels[sel], out.score.numpy()[sel]),) + base[kind][
                1:
            ]
            continue
        sub = AnomalyOutput(out.anomaly_map[sel], out.score[sel], out.max_score[sel])
        r = evaluate_outputs(sub, masks[sel], labels[sel], cal)
        types[kind] = (r.image_auroc, r.pixel_auroc, r.pro)
    return types


def run(args, root: Path, data: dict, superset, text: str) -> None:
    mcfg, tcfg, ccfg = configs(args, parse_run(text))
    layers = mcfg.layers or backbone_info(args.backbone).default_layers
    idx = channel_slice(args.backbone, superset, layers)
    t0 = time.perf_counter()
    fitted, train_s = trained_head(args, root, data, superset, text, mcfg, tcfg, idx)
    head = fitted.head
    # the global Gaussian always on the whole training split (cheap: pooled means), so that a
    # --screen-train CAE still has the product's global term
    fit_global_term(head, data["train"][:, idx].flatten(2), torch.device("cpu"))
    fit_score_scales(head, (f[:, idx].float() for f in data["es"].split(8)))
    fit_s = train_s + time.perf_counter() - t0
    fit_s += data["feature_seconds"] * len(idx) / data["train"].shape[1]
    cal_out = head_outputs(head, data["cal"], idx)
    t_head = time.perf_counter()
    out = head_outputs(head, data["test"], idx)
    # backbone (measured at caching, superset layers) + this head, per test image
    ms_image = data["ms_per_image"] + (time.perf_counter() - t_head) * 1000 / len(out.score)
    masks, labels = data["masks"].numpy(), data["labels"].numpy()
    # rescoring variants: score / smoothing / calibration fields (+ the benchmark-only
    # map_global), no retraining
    variants = [("", {})] + [(f" | {v}", parse_run(v)) for v in args.rescore]
    base_cfg, base_ev, base_types = head.config, None, None
    for suffix, changes in variants:
        map_global = changes.pop("map_global", None)
        m_changes = {k: v for k, v in changes.items() if hasattr(base_cfg, k)}
        c_changes = {k: v for k, v in changes.items() if not hasattr(base_cfg, k)}
        head.config = dataclasses.replace(base_cfg, **m_changes)
        if head.config.global_weight > 0 and base_cfg.global_weight <= 0:
            raise SystemExit("a head trained without a global term cannot be rescored with one")
        if m_changes:
            fit_score_scales(head, (f[:, idx].float() for f in data["es"].split(8)))
            cal_o = head_outputs(head, data["cal"], idx)
            test_o = head_outputs(head, data["test"], idx)
        else:
            cal_o, test_o = cal_out, out
        if map_global is not None:
            cal_o = map_with_global(head, cal_o, data["cal"], idx, map_global)
            test_o = map_with_global(head, test_o, data["test"], idx, map_global)
        cal = calibrate_outputs(cal_o, dataclasses.replace(ccfg, **c_changes))
        maps_changed = map_global is not None or bool(set(m_changes) - IMAGE_SCORE_FIELDS)
        if not suffix or maps_changed:
            ev = evaluate_outputs(test_o, masks, labels, cal, ms_image)
            base_ev = ev if not suffix else base_ev
        elif m_changes:  # image score only: the maps (and pixel metrics) are the base row's
            ev = image_only(base_ev, test_o, labels, cal)
        else:  # thresholds only: the ranking metrics are the base row's
            tm = metrics.threshold_metrics(masks, test_o.anomaly_map.numpy(), cal.pixel_threshold)
            op = metrics.image_operating_point(labels, test_o.score.numpy(), cal.image_threshold)
            ev = base_ev._replace(
                f1=tm.f1, iou=tm.iou, realised_image_fpr=op.fpr, realised_image_recall=op.recall
            )
        types = {}
        if args.per_type:
            types = per_type(data, test_o, labels, cal, None if maps_changed else base_types)
            base_types = types if not suffix else base_types
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


def time_backbones(names: list[str], size: int, rounds: int, batch: int = 8) -> None:
    """ms/image of each backbone's default-layer extractor (features only, fp32, this process's
    threads), alternating the backbones round by round so load drifts hit all of them alike."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(batch, size, size, 3), dtype=np.uint8)
    extractors = {
        n: build_extractor(ModelConfig(backbone=n, image_size=size)).eval() for n in names
    }
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, extractor in extractors.items():
            t0 = time.perf_counter()
            for _ in feature_batches(extractor, images, batch, torch.device("cpu")):
                pass
            times[name].append((time.perf_counter() - t0) * 1000 / batch)
    ref = float(np.median(times[names[0]][1:]))
    for name in names:
        med = float(np.median(times[name][1:]))
        chans = sum(
            layer.channels
            for layer in backbone_info(name).layers
            if layer.name in backbone_info(name).default_layers
        )
        print(
            f"| {name} | {chans} | {med:.1f} | {med / ref:.2f} | "
            f"{' '.join(f'{t:.0f}' for t in times[name][1:])} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an MVTec-layout category root")
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--superset", default="", help="'+'-separated layers, backbone order")
    ap.add_argument("--run", action="append", default=[], help="field=v;field=v (one head each)")
    ap.add_argument("--rescore", action="append", default=[], help="field=v;... rescoring only")
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument(
        "--screen-train", type=int, default=None, help="train on the first N of the train split"
    )
    ap.add_argument("--cache", default="/tmp/acc/cache")
    ap.add_argument("--heads", default="/tmp/acc/heads", help="trained heads, reused by --run")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-type", action="store_true")
    ap.add_argument("--cache-only", action="store_true", help="extract and cache, no runs")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument(
        "--time-backbones", default="", help="'+'-separated backbones: ms/image only, no data"
    )
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds of --time-backbones")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.time_backbones:
        print(
            "| backbone | C (default layers) | ms/img (median) | ratio | per round |\n"
            + "|---" * 5
            + "|"
        )
        time_backbones(args.time_backbones.split("+"), args.size, args.rounds)
        return
    if not args.data or not args.superset:
        ap.error("--data and --superset are required (unless --time-backbones)")
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
