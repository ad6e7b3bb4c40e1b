"""GPU readiness in one go (about 5 minutes on one GPU): precision parity, actor throughput, job.

    python benchmarks/gpu_check.py [--budget 300] [--job-images 3000]

On a machine without CUDA it prints that there is no GPU and exits 0. With CUDA:

1. parity: a small mobilenet_v2 model (offline weights, 128 px) trained briefly on synthetic
   images; maps, scores and calibrated thresholds at fp32 on CUDA against fp32 on the CPU (the
   precision contract says fp32 scores agree across devices) and against the reduced precision
   (bf16, or fp16 where bf16 is unsupported) on CUDA, calibrated at its own precision;
2. throughput of the scoring actor's compute (dfr_core.inference: host-to-device copy,
   normalisation, backbone, head, as ScoringActor._score_group runs it) in images/s at batch
   32/64/128, for mobilenet_v2 (default layers, 256 px) and the paper configuration (VGG19
   relu1_1..relu4_4, 3456 channels, d = 200, 256 px; random weights: none ship offline, and
   speed does not depend on weight values), fp32 and reduced precision;
3. the whole Ray Data scoring job (read, decode, one GPU actor, Parquet, masks off) on
   ``--job-images`` generated 256 px PNGs, with the default (sized) resources;

then one table. A step that would overrun ``--budget`` seconds is skipped and says so.

``--cpu-smoke`` runs every step on the CPU at toy sizes (a few images, one epoch, batch 2): the
figures mean nothing, but a test runs it (tests/integration/test_gpu_check_smoke.py), so the one
run a lent GPU gets is not lost to an API that moved since the script last ran on one.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROWS: list[tuple[str, str, str]] = []  # (check, case, result): the final table
LINE = "metal_plate"


class Scale(NamedTuple):
    """How much each step does: the real check's sizes, or --cpu-smoke's toy ones."""

    parity_px: int  # the parity model's input size
    parity_images: tuple[int, int, int, int]  # train, early-stopping, calibration, test
    epochs: int
    job_model_images: int  # training images of the 256 px model the job scores with
    batches: tuple[int, ...]  # actor throughput batch sizes
    min_seconds: float  # each throughput case runs at least this long (and 3 batches)
    job_images: int | None  # None: --job-images


FULL = Scale(128, (48, 8, 8, 8), 8, 16, (32, 64, 128), 2.0, None)
SMOKE = Scale(64, (6, 2, 4, 4), 1, 4, (2,), 0.0, 16)


def row(check: str, case: str, result: str) -> None:
    ROWS.append((check, case, result))
    print(f"{check} | {case} | {result}", flush=True)


def _rel(a, b) -> float:  # noqa: ANN001 - torch tensors
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _synthetic(n: int, size: int, seed: int = 0) -> np.ndarray:
    from pipeline.demo.synthetic import render_normal

    with ThreadPoolExecutor(os.cpu_count() or 4) as pool:
        imgs = pool.map(
            lambda i: render_normal(LINE, np.random.default_rng(seed + i), size), range(n)
        )
        return np.stack(list(imgs))


def reduced_precision(device) -> str:  # noqa: ANN001 - torch.device
    """bf16 where the GPU has it, else fp16; bf16 on the CPU (--cpu-smoke)."""
    import torch

    if device.type != "cuda":
        return "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _sync(device) -> None:  # noqa: ANN001
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def parity(device, workdir: Path, scale: Scale = FULL) -> Path:  # noqa: ANN001
    """Train, calibrate at fp32 on CUDA, compare with CPU fp32 and CUDA reduced precision."""
    import torch

    from dfr_core.artifact import save_model
    from dfr_core.calibrate import calibrate, compute_maps
    from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
    from dfr_core.model import build_extractor
    from dfr_core.precision import PrecisionSpec
    from dfr_core.train import fit

    size = scale.parity_px
    n_train, n_val, n_held, n_test = scale.parity_images
    a, b, c = n_train, n_train + n_val, n_train + n_val + n_held
    config = ModelConfig(image_size=size)
    train = TrainConfig(epochs=scale.epochs, batch_size=8, positions_per_image=256, patience=0)
    images = _synthetic(c + n_test, size)
    t0 = time.perf_counter()
    result = fit(build_extractor(config), config, train, images[:a], images[a:b], device)
    model = result.model.to(device).eval()
    held, test = images[b:c], images[c:]
    cal_cfg = CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1)
    cal32 = calibrate(model, held, cal_cfg, device, precision="fp32")
    out32 = compute_maps(model, test, device, precision=PrecisionSpec())
    row(
        "parity",
        f"train + calibrate (mobilenet_v2, {size} px)",
        f"{time.perf_counter() - t0:.1f} s",
    )
    cpu, dev = torch.device("cpu"), device.type.upper()
    out_cpu = compute_maps(model, test, cpu, precision=PrecisionSpec())
    cal_cpu = calibrate(model, held, cal_cfg, cpu, precision="fp32")
    row(
        "parity",
        f"fp32 {dev} vs fp32 CPU",
        f"map max rel diff {_rel(out32.anomaly_map, out_cpu.anomaly_map):.1e}, score "
        f"{_rel(out32.score, out_cpu.score):.1e}, pixel threshold "
        f"{abs(cal32.pixel_threshold / cal_cpu.pixel_threshold - 1):.1e}",
    )
    model.to(device)
    low = reduced_precision(device)
    cal_low = calibrate(model, held, cal_cfg, device, precision=low)
    out_low = compute_maps(model, test, device, precision=cal_low.precision_spec)
    agree = float(
        ((out_low.score > cal_low.image_threshold) == (out32.score > cal32.image_threshold))
        .float()
        .mean()
    )
    row(
        "parity",
        f"{low} {dev} vs fp32 {dev}",
        f"map max rel diff {_rel(out_low.anomaly_map, out32.anomaly_map):.1e}, score "
        f"{_rel(out_low.score, out32.score):.1e}, pixel threshold "
        f"{abs(cal_low.pixel_threshold / cal32.pixel_threshold - 1):.1e}, image threshold "
        f"{abs(cal_low.image_threshold / cal32.image_threshold - 1):.1e}, decisions agree "
        f"{agree:.0%}",
    )
    model.precision = PrecisionSpec()
    directory = workdir / "trained-256"
    config256 = ModelConfig(image_size=256)
    n = scale.job_model_images
    result256 = fit(build_extractor(config256), config256, train, _synthetic(n, 256), None, device)
    save_model(
        result256.model,
        directory,
        calibrate(result256.model, _synthetic(n // 2, 256, 99), cal_cfg, device),
    )
    return directory


def _images_per_second(extractor, head, spec, batch: int, device, min_s: float) -> float:  # noqa: ANN001
    """The actor's compute on one batch, repeated for at least ``min_s`` s and 3 batches
    (after one warm-up)."""
    from dfr_core.inference import extract, head_output, to_model_input

    images = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), np.uint8)

    def step() -> None:
        maps = extract(extractor, to_model_input(images, device), spec)
        head_output(head, extractor, maps, spec).score.cpu()  # the actor reads scores back

    step()
    _sync(device)
    n, t0 = 0, time.perf_counter()
    while n < 3 * batch or time.perf_counter() - t0 < min_s:
        step()
        n += batch
    _sync(device)
    return n / (time.perf_counter() - t0)


def throughput(device, deadline: float, scale: Scale = FULL) -> None:  # noqa: ANN001
    import torch

    from dfr_core.config import ModelConfig
    from dfr_core.inference import prepare_extractor
    from dfr_core.model import DFRHead, build_extractor
    from dfr_core.precision import PrecisionSpec

    vgg = ("relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3",
           "relu3_4", "relu4_1", "relu4_2", "relu4_3", "relu4_4")  # fmt: skip
    paper = ModelConfig(backbone="vgg19", layers=vgg, image_size=256)
    cases = [
        ("mobilenet_v2", ModelConfig(image_size=256), 64, False),
        ("paper VGG19-12, d=200", paper, 200, True),
    ]
    specs = [PrecisionSpec(), PrecisionSpec.for_device(reduced_precision(device), device)]
    cuda = device.type == "cuda"
    for name, config, latent, random_init in cases:
        head = None
        for spec in specs:
            # as the actor prepares it for this precision (a bf16 backbone stores bf16 weights)
            extractor = build_extractor(config, allow_random_init=random_init).eval()
            extractor = prepare_extractor(extractor, device, spec)
            if head is None:
                head = DFRHead(config, extractor.channels, latent).to(device).eval()
            for batch in scale.batches:
                case = f"{name} {spec.dtype} batch {batch}"
                if time.perf_counter() > deadline:
                    row("actor throughput", case, "skipped: budget")
                    continue
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                ips = _images_per_second(extractor, head, spec, batch, device, scale.min_seconds)
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
                memory = "" if peak is None else f" (GPU peak {peak:.1f} GiB)"
                row("actor throughput", case, f"{ips:.0f} img/s{memory}")
        if cuda:
            torch.cuda.empty_cache()


def job(trained: Path, workdir: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    from PIL import Image

    from pipeline import registry
    from pipeline.ray_runtime import init_ray
    from pipeline.resources import ClusterShape, plan_resources
    from pipeline.score_job import ScoreJobConfig, resource_request, run_score_job

    models = str(workdir / "models")
    registry.publish(trained, models, LINE)
    pool = _synthetic(64, 256, 1000)
    archive = workdir / "archive" / LINE
    archive.mkdir(parents=True)
    blobs = []
    for img in pool:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    uris = [str(archive / f"img_{i:06d}.png") for i in range(n)]
    for i, uri in enumerate(uris):
        Path(uri).write_bytes(blobs[i % len(blobs)])
    listing = workdir / "listing.parquet"
    pq.write_table(pa.table({"image_uri": uris, "product_line": [LINE] * n}), listing)
    config = ScoreJobConfig(
        models_uri=models, input_uri=str(listing), output_uri=str(workdir / "out"),
        run_date="2024-05-01", masks="none", cache_dir=str(workdir / "cache"), quiet=True,
    )  # fmt: skip
    started = init_ray("local")  # a process already connected (a test) keeps its Ray
    try:
        plan = plan_resources(resource_request(config), ClusterShape.from_ray(), config.max_pixels)
        summary = run_score_job(config)
    finally:
        if started:
            ray.shutdown()
    row(
        "Ray Data job",
        f"{n} PNGs (256 px), {plan.describe()}",
        f"{summary.counts['ok']}/{summary.counts['rows']} ok, "
        f"{summary.images_per_second:.0f} img/s ({summary.seconds:.0f} s incl. actor start)",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check")
    ap.add_argument("--job-images", type=int, default=3000)
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="every step on the CPU at toy sizes (tests)"
    )
    args = ap.parse_args(argv)
    import torch

    if args.cpu_smoke:
        device, scale, name = torch.device("cpu"), SMOKE, "the CPU (--cpu-smoke: toy sizes)"
    elif torch.cuda.is_available():
        device, scale = torch.device("cuda"), FULL
        name = torch.cuda.get_device_name(device)
    else:
        print("no GPU: CUDA is not available on this machine; nothing to check (exit 0)")
        return 0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = time.perf_counter()
    deadline = start + args.budget
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    job_images = scale.job_images or args.job_images
    with tempfile.TemporaryDirectory(prefix="dfr-gpu-check-") as tmp:
        workdir = Path(tmp)
        trained = parity(device, workdir, scale)
        # leave the job about a third of the budget
        throughput(device, start + 0.6 * args.budget, scale)
        remaining = deadline - time.perf_counter()
        if remaining > 60:
            job(trained, workdir, job_images if remaining > 120 else job_images // 3)
        else:
            row("Ray Data job", f"{job_images} PNGs", "skipped: budget")
    print(f"\nGPU check on {name} ({time.perf_counter() - start:.0f} s)")
    print("| check | case | result |\n|---|---|---|")
    for check, case, result in ROWS:
        print(f"| {check} | {case} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
