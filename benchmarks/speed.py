"""Speed and memory: VGG19 12-layer regional features + CAE at 256 px, ours vs the literal
upsample-then-pool computation, in the same run on this CPU.

    python benchmarks/speed.py --images 8 --batch 1

Three ways to compute the same (B, 3456, 64, 64) features:
- ours: each layer pooled/interpolated at its native resolution (dfr_core.features);
- literal-per-layer: the reference code's loop (upsample one layer to S x S, pool, concatenate);
- literal-concat: upsample every layer to S x S, concatenate, then pool (the ~1 GB formulation).
Each runs twice, features only and features + CAE, in its own subprocess so that peak RSS is
measured cleanly (ru_maxrss of the child minus its RSS once the model is built). VGG19 runs with
random weights here (no weights ship offline); time and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

METHODS = ("ours", "literal-per-layer", "literal-concat")


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(
    method: str, with_cae: bool, images: int, batch: int, size: int, latent: int, threads: int
) -> dict:
    import torch
    import torch.nn.functional as F

    from dfr_core.cae import CAE
    from dfr_core.config import ModelConfig
    from dfr_core.features import literal_regional_features
    from dfr_core.model import build_extractor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    extractor = build_extractor(
        ModelConfig(backbone="vgg19", image_size=size), allow_random_init=True
    )
    cae = CAE(extractor.channels, latent).eval()
    x = torch.randn(batch, 3, size, size)

    def features() -> torch.Tensor:
        if method == "ours":
            return extractor(x)
        maps = extractor.backbone(x)
        if method == "literal-per-layer":
            return literal_regional_features(maps, size, 4)
        up = [
            F.interpolate(m, size=(size, size), mode="bilinear", align_corners=True) for m in maps
        ]
        return F.avg_pool2d(torch.cat(up, dim=1), 4, 4)

    def run() -> torch.Tensor:
        with torch.no_grad():
            feats = features()
            if not with_cae:
                return feats[:, 0]
            return (cae(feats) - feats).pow(2).mean(dim=1)

    base = _rss_mb()  # the model and input are built; everything above this is activations
    run()  # warm-up (allocator, lazy init)
    t0 = time.perf_counter()
    n = 0
    while n < images:
        out = run()
        n += batch
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "method": method,
        "stage": "features + CAE" if with_cae else "features",
        "ms_per_image": 1000 * elapsed / n,
        "peak_rss_mb": peak,
        "peak_over_model_mb": peak - base,
        "channels": extractor.channels,
        "grid": list(out.shape[-2:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--latent", type=int, default=256, help="CAE latent width d")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--cae", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        res = child(
            args.child,
            bool(args.cae),
            args.images,
            args.batch,
            args.size,
            args.latent,
            args.threads,
        )
        print(json.dumps(res))
        return
    rows = []
    for with_cae in (0, 1):
        for method in METHODS:
            cmd = [sys.executable, __file__, "--child", method, f"--cae={with_cae}"] + [
                f"--{k}={getattr(args, k)}"
                for k in ("images", "batch", "size", "latent", "threads")
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"VGG19 relu1_1..relu4_4 ({rows[0]['channels']} channels) -> grid {rows[0]['grid']}, "
        f"CAE d={args.latent}, {args.size} px, batch {args.batch}, {args.images} images, "
        f"{args.threads} threads"
    )
    print(
        "| stage | method | ms/image | peak RSS MB | peak above model MB | vs ours: time, memory |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        ours = next(o for o in rows if o["stage"] == r["stage"] and o["method"] == "ours")
        ratio_t = r["ms_per_image"] / ours["ms_per_image"]
        ratio_m = r["peak_over_model_mb"] / max(ours["peak_over_model_mb"], 1.0)
        print(
            f"| {r['stage']} | {r['method']} | {r['ms_per_image']:.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_over_model_mb']:.0f} | {ratio_t:.2f}x, {ratio_m:.1f}x |"
        )


if __name__ == "__main__":
    main()
