"""How far the paper configuration's bf16 (or int8) fast path is from its arithmetic floor here.

    python benchmarks/speed_floor.py --rounds 5
    python benchmarks/speed_floor.py --rounds 5 --precision int8

The model and protocol of `speed.py` (VGG19 relu1_1..relu4_4, 256 px, CAE latent d = 200,
batch 1, two threads, random weights). In one process, alternating in every round:

- **convs**: the backbone alone (convolutions and ReLUs up to relu4_4, bf16 autocast,
  channels_last, weights stored at bf16 as a bf16 scoring actor holds them), no pooling;
- **head GEMMs**: the fast path's matmuls alone for one image: the shapes, chunks and dtype
  of `FoldedHead.error_grid` (the coarse layers' first layer at native resolution, then per
  chunk the first layer's fine part, the middle layers and the last one, by channel group),
  on fixed operands;
- **full**: `extract_regional` + `FoldedHead.error_grid`, what `speed.py` times as fast-bf16.

``--precision int8``: the head's products are int8 GEMMs (`torch._int_mm` on int8 operands, as
`dfr_core.quantized` runs them, in its blocks) on the same bf16 backbone, and "full" is
speed.py's fast-int8-bf16; the rest then also holds quantising each product's input and
scaling its output back.

Printed per round and as medians: ms per image of each part, their multiply-adds and rates,
and "rest" = full - convs - head GEMMs: everything that is neither a convolution nor one of
the head's matmuls (regional pooling, the coarse bands, dtype conversions, additions, the
squared error, Python). convs + head GEMMs is the floor of this arithmetic on this machine:
no exact rearrangement of the same multiply-adds runs faster than the kernels that do them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from speed import VGG19_12  # the same layers as speed.py (this folder is on sys.path)

from dfr_core.chunks import channel_blocks, chunk_rows, quant_rows, row_parts
from dfr_core.config import ModelConfig
from dfr_core.fastpath import FoldedHead, extract_regional, folded_head
from dfr_core.inference import prepare_extractor
from dfr_core.model import DFRHead, build_extractor
from dfr_core.precision import PrecisionSpec
from dfr_core.quantized import OUT_BLOCK, Int8Weight
from dfr_core.regional_maps import autocast_to


def conv_macs(backbone: torch.nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of every convolution one forward pass runs (counted by hooks)."""
    total = 0

    def hook(module: torch.nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += out.numel() * (module.in_channels // module.groups) * kh * kw

    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    handles = [m.register_forward_hook(hook) for m in convs]
    with torch.no_grad(), autocast_to(x.device, convs[0].weight.dtype):
        for _ in backbone.iter_maps(x):
            pass
    for handle in handles:
        handle.remove()
    return total


def head_gemms(fold: FoldedHead, native_hw: list[tuple[int, int]]) -> tuple[list, int]:
    """The (operand, weight) pairs `FoldedHead.error_grid` multiplies for one image
    (``operand @ weight.T``, positions as rows), and their multiply-adds; operands are fixed
    random tensors of the right shapes and dtype."""
    gh, g = fold.grid_hw
    parts = row_parts(gh, chunk_rows(fold.width, g))
    nf = fold.layout.n_fine
    gen = torch.Generator().manual_seed(0)

    def operand(n: int, k: int) -> torch.Tensor:
        if fold.int8:
            return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        return torch.randn(n, k, generator=gen).to(fold.dtype)

    def matrix(w: torch.Tensor | Int8Weight) -> torch.Tensor:
        return w.q if isinstance(w, Int8Weight) else w

    def blocks(x: torch.Tensor, w: torch.Tensor, step: int | None = None) -> list:
        """int8: the shapes `dfr_core.quantized.int8_product` runs (OUT_BLOCK output channels
        per GEMM; ``step`` rows at a time where `FoldedHead` blocks the rows too)."""
        if not fold.int8:
            return [(x, w)]
        step = step or x.shape[0]
        return [
            (x[r : r + step], w[lo : lo + OUT_BLOCK])
            for r in range(0, x.shape[0], step)
            for lo in range(0, w.shape[0], OUT_BLOCK)
        ]

    pairs = []
    for w, (h, w_) in zip(fold.w1_coarse, native_hw, strict=True):
        m = matrix(w)  # int8: native positions in blocks of quant_rows
        pairs += blocks(operand(h * w_, m.shape[1]), m, quant_rows(max(m.shape)))
    # the last layer in channel groups, as `FoldedHead._chunk` runs it: fine (int8: in
    # channel blocks too), then coarse blocks
    groups = channel_blocks(nf) if fold.int8 else [(0, nf)] if nf else []
    start = nf
    for width in fold.layout.coarse_widths:
        groups += [(start + lo, start + hi) for lo, hi in channel_blocks(width)]
        start += width
    for r0, r1 in parts:
        n = (r1 - r0) * g
        weights = [matrix(fold.w1_fine)] + [matrix(layer.weight) for layer in fold.middle]
        weights += [matrix(fold.w_last)[lo:hi] for lo, hi in groups]
        for w in weights:
            if w.shape[1]:
                pairs += blocks(operand(n, w.shape[1]), w)
    macs = sum(w.shape[0] * w.shape[1] * x.shape[0] for x, w in pairs)
    return pairs, macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--images", type=int, default=4, help="timed images per part and round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("bf16", "int8"), default="bf16", help="the head's")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig(backbone="vgg19", layers=VGG19_12, image_size=256)
    extractor = build_extractor(config, allow_random_init=True).eval()
    head = DFRHead(config, extractor.channels, 200).eval()
    dtype = torch.bfloat16  # the backbone's, under either head
    # as a scoring actor prepares it: channels_last, the backbone's weights stored at bf16
    cpu = torch.device("cpu")
    spec = PrecisionSpec.for_device(args.precision, cpu, "bf16")
    extractor = prepare_extractor(extractor, cpu, spec)
    x = torch.randn(1, 3, 256, 256).contiguous(memory_format=torch.channels_last)
    fold = folded_head(head, extractor, spec.torch_dtype)
    maps = extract_regional(extractor, x, dtype)
    pairs, gemm_macs = head_gemms(fold, [tuple(m.shape[-2:]) for m in maps.coarse])
    cmacs = conv_macs(extractor.backbone, x)

    def convs() -> None:
        with torch.autocast("cpu", dtype=dtype):
            for _ in extractor.backbone.iter_maps(x):
                pass

    def gemms() -> None:
        for x, w in pairs:
            torch._int_mm(x, w.T) if fold.int8 else torch.matmul(x, w.T)

    def full() -> None:
        fold.error_grid(extract_regional(extractor, x, dtype))

    parts = {"convs": convs, "head GEMMs": gemms, "full": full}
    times: dict[str, list[float]] = {name: [] for name in parts}
    with torch.no_grad():
        for fn in parts.values():
            fn()  # warm-up
        for r in range(args.rounds):
            for name, fn in parts.items():
                t0 = time.perf_counter()
                for _ in range(args.images):
                    fn()
                times[name].append(1000 * (time.perf_counter() - t0) / args.images)
            rest = times["full"][-1] - times["convs"][-1] - times["head GEMMs"][-1]
            line = ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items())
            print(f"round {r + 1}: {line}, rest {rest:.0f} ms", flush=True)
    med = {n: statistics.median(t) for n, t in times.items()}
    split = zip(times["full"], times["convs"], times["head GEMMs"], strict=True)
    rests = [f - c - g for f, c, g in split]
    print(
        f"\nVGG19-12, 256 px, d=200, head {args.precision} (backbone bf16), batch 1, "
        f"{args.threads} threads, {args.rounds} rounds x {args.images} images (medians)"
    )
    print("| part | ms/image | GMAC/image | GMAC/s |")
    print("|---|---|---|---|")
    print(f"| convs | {med['convs']:.0f} | {cmacs / 1e9:.1f} | {cmacs / med['convs'] / 1e6:.0f} |")
    print(
        f"| head GEMMs | {med['head GEMMs']:.0f} | {gemm_macs / 1e9:.1f} | "
        f"{gemm_macs / med['head GEMMs'] / 1e6:.0f} |"
    )
    floor = med["convs"] + med["head GEMMs"]
    print(f"| floor (convs + head GEMMs) | {floor:.0f} | {(cmacs + gemm_macs) / 1e9:.1f} | - |")
    method = "fast-bf16" if args.precision == "bf16" else "fast-int8-bf16"  # speed.py's name
    print(f"| full {method} | {med['full']:.0f} | - | - |")
    print(f"| rest (full - floor) | {statistics.median(rests):.0f} | - | - |")


if __name__ == "__main__":
    main()
