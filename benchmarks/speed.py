"""Speed and memory of the paper's configuration: the reference computation against ours.

    python benchmarks/speed.py --images 4 --rounds 3

VGG19 relu1_1..relu4_4 (3456 channels), 256 px, CAE latent d = 200, batch 1, two threads; the
per-position error grid of one image, computed seven ways, each in its own subprocess (so peak
RSS is clean), alternating method by method for ``--rounds`` rounds (the machine is shared:
compare ratios within a round, not absolute times):

- reference: the reference implementation's computation, as its code does it: all maps held,
  each layer bilinearly upsampled to S x S (align_corners=True), averaged over 4 x 4 windows
  by unfold + mean, concatenated onto the features so far; then the CAE (nn.Module,
  conv/BN/ReLU) at every grid position and the squared error (`reference_features` below +
  `DFRHead.error_grid`);
- pooled (before this change): native-resolution pooling (`FeatureExtractor`) + the same head;
- fast: the exact fast path (`dfr_core.fastpath`: coarse layers' first CAE layer at native
  resolution, BN/standardisation folded, chunked positions; at fp32 on the CPU VGG19's first
  three blocks in stripes of rows, `dfr_core.backbones.stripes`) with a channels_last
  backbone prepared as a scoring actor prepares it (`dfr_core.inference.prepare_extractor`:
  at fp32 on the CPU, the wide 3x3 convolutions as Winograd F(2x2, 3x3), `dfr_core.winograd`);
- fast-bf16: the same in bf16 (opt-in: a model calibrated at bf16, see dfr_core.precision),
  the backbone's weights stored at bf16 as a bf16 scoring actor holds them
  (`dfr_core.inference.prepare_extractor`: autocast's maps bit for bit, half the weights);
- fast-int8: the head's products in int8 (`dfr_core.quantized`; opt-in: a model calibrated at
  int8) on an fp32 backbone (Winograd, as in fast), as `calibrate(..., precision="int8")`
  records it by default;
- fast-int8-heap: fast-int8 in a process whose malloc thresholds `dfr_core.heap.bound_heap`
  set (opt-in, for a batch-1 process: it slows large batches; BENCHMARKS.md);
- fast-int8-bf16: the same head on the bf16 backbone of fast-bf16 (``backbone="bf16"``).

"peak above model" is the child's peak RSS over the timed images minus its RSS once the model
is built and has scored one image (the fast path's folded weights and a bf16 backbone's stored
weights count as model; so does what the first image initialises once: oneDNN's generated
kernels, cached operators); the kernel's high-water mark is reset at that point and the heap's
free pages handed back first, so "peak RSS" is the computation's peak, not the model build's
(building VGG19 peaks higher than the fast path ever does). The first image's own peak, above
the built model, is printed beside it ("first image"). It is printed two
ways: all RSS (the kernel's VmHWM, which also counts the 12-31 MB of oneDNN code from
libtorch that the first convolution and matmul page in: file-backed, shared by every process,
the same for any computation that calls them), and the anonymous memory, the activations
(sampled every millisecond by `_AnonPeak`, in a second child of the same method, so the
sampling never runs beside the timed one; beside it, the timed child's VmHWM minus the code
paged in, a second lower bound that needs no sampling). VGG19 uses random
weights (none ship offline); time and memory do not depend on weight values. The fp32
methods' outputs are compared with the reference's in the same child (max relative
difference, printed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

METHODS = (
    "reference", "pooled", "fast", "fast-bf16", "fast-int8", "fast-int8-heap", "fast-int8-bf16"
)  # fmt: skip
#: The fast methods' (head precision, backbone precision): fast-int8 is what
#: `calibrate(..., precision="int8")` records by default (an fp32 backbone: the configuration
#: within the parity criterion); fast-bf16 and fast-int8-bf16 run a bf16 backbone (faster,
#: outside it on Magnetic-tile: BENCHMARKS.md, "Speed and memory").
FAST = {
    "fast": ("fp32", None),
    "fast-bf16": ("bf16", "bf16"),
    "fast-int8": ("int8", "fp32"),
    "fast-int8-heap": ("int8", "fp32"),
    "fast-int8-bf16": ("int8", "bf16"),
}
#: Methods run with `dfr_core.heap.bound_heap` applied to their process (opt-in: a batch-1
#: process's setting; BENCHMARKS.md, "Speed and memory").
BOUNDED_HEAP = ("fast-int8-heap",)
VGG19_12 = (
    "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3", "relu3_4",
    "relu4_1", "relu4_2", "relu4_3", "relu4_4",
)  # fmt: skip


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    return _status_mb("VmRSS")


def _anon_mb() -> float:
    """Anonymous resident memory (statm: resident - shared, i.e. without file-backed pages such
    as the library code a first call pages in), in MB."""
    with open("/proc/self/statm") as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * resource.getpagesize() / 2**20


class _AnonPeak:
    """The peak of `_anon_mb` while the block runs, sampled every millisecond by a thread.

    VmHWM also counts file-backed pages: the first convolution and matmul page in 12-31 MB
    of oneDNN code from libtorch on the dev machine (shared by every process on the node, the
    same for any computation that calls it). The anonymous peak is the activations' memory.
    Sampling can miss a peak shorter than a millisecond: a lower bound, checked against VmHWM
    minus the file-backed pages the run added (another lower bound, printed beside it)."""

    def __init__(self) -> None:
        self.base = self.peak = _anon_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _anon_mb())

    def __enter__(self) -> _AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _anon_mb())


def _reset_peak_rss() -> None:
    """Start the peak-RSS high-water mark afresh (Linux: ``clear_refs`` 5), so that the
    transient memory of building the model (the whole VGG19 is built, then cut at relu4_4) is
    not read as the computation's peak."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def reference_features(maps: list, size: int, pool: int):  # noqa: ANN201 - torch is lazy here
    """The reference code's regional features: upsample, unfold-mean, concatenate per layer."""
    import torch
    import torch.nn.functional as F

    feats = torch.empty(maps[0].shape[0], 0, (size // pool) ** 2)
    for fmap in maps:
        up = F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=True)
        cols = F.unfold(up, kernel_size=pool, stride=pool)  # (B, C * pool^2, L)
        agg = cols.view(up.shape[0], up.shape[1], pool * pool, -1).mean(dim=2)
        feats = torch.cat([feats, agg], dim=1)
    return feats.view(feats.shape[0], feats.shape[1], size // pool, size // pool)


def _split_ms(extract, extractor, fold, x, dtype, images: int) -> tuple[float, float]:  # noqa: ANN001
    """Where a fast method's time goes, after the timed loop: ms per image in the backbone
    with its regional pooling (``extract``: `dfr_core.fastpath.extract_regional`), and in the
    head (the folded CAE and the squared error)."""
    import torch

    backbone = head = 0.0
    with torch.no_grad():
        for _ in range(images):
            t0 = time.perf_counter()
            maps = extract(extractor, x, dtype)
            t1 = time.perf_counter()
            fold.error_grid(maps)
            backbone, head = backbone + t1 - t0, head + time.perf_counter() - t1
    return 1000 * backbone / images, 1000 * head / images


def child(
    method: str, images: int, batch: int, size: int, latent: int, threads: int, sample: bool
) -> dict:
    """One method in this process: timed, or (``sample``) the same run with the anonymous
    memory sampled (a separate child, so that the sampling thread never shares the timed
    run's CPUs)."""
    import torch

    from dfr_core.config import ModelConfig
    from dfr_core.fastpath import extract_regional, folded_head
    from dfr_core.heap import bound_heap, release_free_heap
    from dfr_core.inference import prepare_extractor
    from dfr_core.model import DFRHead, build_extractor
    from dfr_core.precision import PrecisionSpec

    torch.set_num_threads(threads)
    if method in BOUNDED_HEAP:
        bound_heap()  # dfr_core.heap's malloc thresholds, for this whole process
    config = ModelConfig(backbone="vgg19", layers=VGG19_12, image_size=size)

    def fp32_extractor():  # noqa: ANN202 - the same random weights on every call
        torch.manual_seed(0)
        return build_extractor(config, allow_random_init=True).eval()

    extractor = fp32_extractor()
    head = DFRHead(config, extractor.channels, latent).eval()
    x = torch.randn(batch, 3, size, size)
    dtype = torch.float32  # the backbone's

    def reference(ext=extractor) -> torch.Tensor:  # noqa: ANN001
        return head.error_grid(reference_features(ext.backbone(x), size, 4))

    if method in FAST:
        # as a scoring actor prepares it: channels_last; a bf16 backbone's weights at bf16
        cpu = torch.device("cpu")
        precision, backbone = FAST[method]
        spec = PrecisionSpec.for_device(precision, cpu, backbone)
        extractor = prepare_extractor(extractor, cpu, spec)
        dtype = spec.backbone_dtype
        xin = x.contiguous(memory_format=torch.channels_last)
        fold = folded_head(head, extractor, spec.torch_dtype)

        def run() -> torch.Tensor:
            return fold.error_grid(extract_regional(extractor, xin, dtype))
    elif method == "pooled":

        def run() -> torch.Tensor:
            return head.error_grid(extractor(x))
    else:
        run = reference

    def baseline() -> tuple[float, float, float]:
        # what building (or the first image) freed must not be counted as room for what follows
        release_free_heap()
        base = (_rss_mb(), _anon_mb(), _status_mb("RssFile"))
        _reset_peak_rss()
        return base

    with torch.no_grad():
        # the first image: lazy initialisation (oneDNN's kernels are generated at their first
        # call, caches filled) besides its activations; measured above the built model
        base, base_anon, base_file = baseline()
        with _AnonPeak() if sample else contextlib.nullcontext() as first_anon:
            out = run()
        first = _status_mb("VmHWM") - base - (_status_mb("RssFile") - base_file)
        # the images after it, above the model as the first image left it (trimmed)
        base, base_anon, base_file = baseline()
        with _AnonPeak() if sample else contextlib.nullcontext() as anon:
            t0, c0 = time.perf_counter(), time.process_time()
            n = 0
            while n < images:
                run()
                n += batch
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _status_mb("VmHWM")
        paged_in = _status_mb("RssFile") - base_file  # library code the run paged in
        if sample:
            return {
                "anon_peak_over_model_mb": anon.peak - base_anon,
                "first_anon_peak_mb": first_anon.peak - first_anon.base,
            }
        split = (
            _split_ms(extract_regional, extractor, fold, xin, dtype, n) if method in FAST else None
        )
        if method == "reference":
            ref = out
        else:  # a bf16 backbone's fp32 weights are gone: the reference on a fresh fp32 build
            ref = reference(extractor if dtype == torch.float32 else fp32_extractor())
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    return {
        "method": method,
        "ms_per_image": 1000 * elapsed / n,
        "cpu_ms_per_image": 1000 * cpu / n,
        "peak_rss_mb": peak,
        "peak_over_model_mb": peak - base,
        "code_paged_in_mb": paged_in,
        "anon_floor_over_model_mb": peak - base - paged_in,
        "first_floor_mb": first,
        "max_rel_diff": rel,
        "backbone_head_ms": split,
        "channels": extractor.channels,
        "grid": list(out.shape[-2:]),
    }


def _run_child(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4, help="timed images per child")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of all methods")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--latent", type=int, default=200, help="CAE latent width d")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--sample", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    keys = ("images", "batch", "size", "latent", "threads")
    if args.child:
        print(json.dumps(child(args.child, *(getattr(args, k) for k in keys), args.sample)))
        return
    rows: dict[str, list[dict]] = {m: [] for m in args.methods}
    for r in range(args.rounds):
        for method in args.methods:
            cmd = [sys.executable, __file__, "--child", method]
            cmd += [f"--{k}={getattr(args, k)}" for k in keys]
            res = _run_child(cmd)
            res.update(_run_child([*cmd, "--sample"]))  # the anonymous peak, sampled apart
            rows[method].append(res)
            print(
                f"round {r + 1} {method}: {res['ms_per_image']:.0f} ms/image, "
                f"{res['cpu_ms_per_image']:.0f} CPU ms/image, anonymous peak above model "
                f"{res['anon_peak_over_model_mb']:.0f} MB (first image "
                f"{res['first_anon_peak_mb']:.0f} MB)",
                flush=True,
            )
    first = rows[args.methods[0]][0]
    print(
        f"\nVGG19 relu1_1..relu4_4 ({first['channels']} channels) -> grid {first['grid']}, "
        f"CAE d={args.latent}, {args.size} px, batch {args.batch}, {args.images} images x "
        f"{args.rounds} alternating rounds, {args.threads} threads"
    )
    print(
        "| method | ms/image (median; per round) | CPU ms/image | peak RSS MB | "
        "peak above model MB: all RSS (of it library code paged in); anonymous sampled "
        "(VmHWM - code) | first image: anonymous sampled (VmHWM - code) | vs reference: "
        "speed-up wall, CPU (median of per-round ratios), memory all RSS, anonymous; first "
        "image anonymous | max rel. diff | backbone / head ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ref = rows.get("reference")
    for method, res in rows.items():
        ms = [x["ms_per_image"] for x in res]
        over = statistics.median(x["peak_over_model_mb"] for x in res)
        code = statistics.median(x["code_paged_in_mb"] for x in res)
        anon = statistics.median(x["anon_peak_over_model_mb"] for x in res)
        floor = statistics.median(x["anon_floor_over_model_mb"] for x in res)
        first_anon = statistics.median(x["first_anon_peak_mb"] for x in res)
        first_floor = statistics.median(x["first_floor_mb"] for x in res)
        rss = statistics.median(x["peak_rss_mb"] for x in res)
        cpu = statistics.median(x["cpu_ms_per_image"] for x in res)
        vs = "-"
        if ref:
            pairs = list(zip(ref, res, strict=True))
            speed = statistics.median(a["ms_per_image"] / b["ms_per_image"] for a, b in pairs)
            cpu_speed = statistics.median(
                a["cpu_ms_per_image"] / b["cpu_ms_per_image"] for a, b in pairs
            )
            ref_over = statistics.median(x["peak_over_model_mb"] for x in ref)
            ref_anon = statistics.median(x["anon_peak_over_model_mb"] for x in ref)
            ref_first = statistics.median(x["first_anon_peak_mb"] for x in ref)
            vs = (
                f"{speed:.2f}x, {cpu_speed:.2f}x, {ref_over / max(over, 1.0):.1f}x, "
                f"{ref_anon / max(anon, 1.0):.1f}x; {ref_first / max(first_anon, 1.0):.1f}x"
            )
        rel = max(x["max_rel_diff"] for x in res)
        per_round = "; ".join(f"{m:.0f}" for m in ms)
        split = "-"
        if res[0].get("backbone_head_ms"):
            backbone = statistics.median(x["backbone_head_ms"][0] for x in res)
            head = statistics.median(x["backbone_head_ms"][1] for x in res)
            split = f"{backbone:.0f} / {head:.0f}"
        print(
            f"| {method} | {statistics.median(ms):.0f} ({per_round}) | {cpu:.0f} | {rss:.0f} | "
            f"{over:.0f} ({code:.0f}); {anon:.0f} ({floor:.0f}) | {first_anon:.0f} "
            f"({first_floor:.0f}) | {vs} | {rel:.1e} | {split} |"
        )


if __name__ == "__main__":
    main()
