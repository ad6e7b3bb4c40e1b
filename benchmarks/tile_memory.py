"""Peak memory of the scoring actor's call on very large images (issue 12).

    nice -n 5 python benchmarks/tile_memory.py [--threads 2] [--out /tmp/tile-memory]

What is measured: pipeline.score_stages.ScoringActor.__call__ on a batch holding ONE decoded
image, each case in a fresh subprocess. The actor is built and its model loaded (and run once
on a small image) first; then the process's peak-RSS counter is reset (``5`` to
/proc/self/clear_refs) and the call runs: backbone passes, stitching, smoothing, score, and the
mask and heatmap PNGs written at the original size (--masks all --heatmaps). Reported: the
peak RSS during the call above the RSS just before it ("above the loaded model and the input
batch"), the RSS of the loaded actor, and the call's wall time.

Cases (mobilenet_v2, offline ImageNet weights, default layers; heads trained briefly on
synthetic tiles: only memory and the shape of the work matter here, not accuracy):
- ``untiled-256 @4096``: today's model (image resized to 256 x 256) on a 4096 x 4096 image;
- ``tiled-256 max64 @2048``: 256 px tiles, no overlap, on a 2048 x 2048 image: exactly the
  default cap of 64 tiles;
- ``tiled-256 max256 @4096``: a 4096 x 4096 image at native resolution (256 tiles, a model
  whose max_tiles allows it);
- ``tiled-256 scale0.5 @4096``: the same image at tile_scale 0.5 (64 tiles, a 2048 map);
- ``tiled-256 max64 @4096``: the 4096 image refused by the default cap (too_many_tiles: the
  decode stage refuses it from the header, the actor only passes the error row on).

The images are textured synthetic parts (pipeline.demo.synthetic) decoded by the scoring job's
own decode stage (pipeline.io_stages.decode_batch) before the measurement starts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINE = "metal_plate"
DATE = "2024-07-01"
CASES = {  # name -> (model geometry fields, image side)
    "untiled-256 @4096": ({"image_size": 256}, 4096),
    "tiled-256 max64 @2048": ({"tile": 256, "max_tiles": 64}, 2048),
    "tiled-256 max256 @4096": ({"tile": 256, "max_tiles": 256}, 4096),
    "tiled-256 scale0.5 @4096": ({"tile": 256, "tile_scale": 0.5, "max_tiles": 64}, 4096),
    "tiled-256 max64 @4096": ({"tile": 256, "max_tiles": 64}, 4096),
}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _png(array) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _texture(side: int):
    """A side x side part: a 512 px synthetic texture repeated (rendering 4096 px directly
    would take minutes of CPU), with a small spot so the map is not flat."""
    import numpy as np

    from pipeline.demo.synthetic import render_normal

    base = render_normal(LINE, np.random.default_rng(0), 512)
    reps = -(-side // 512)
    image = np.tile(base, (reps, reps, 1))[:side, :side].copy()
    image[side // 3 : side // 3 + 12, side // 2 : side // 2 + 12] = (250, 40, 40)
    return image


def _train(work: Path, name: str, fields: dict) -> str:
    """Train, calibrate and publish one tiny model of this geometry; returns its models_uri."""
    import numpy as np

    from dfr_core.artifact import save_model
    from dfr_core.calibrate import calibrate
    from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
    from dfr_core.geometry import prepare_image
    from dfr_core.model import build_extractor
    from dfr_core.train import fit
    from pipeline import registry
    from pipeline.demo.synthetic import render_normal

    config = ModelConfig(**fields)
    normal = [render_normal(LINE, np.random.default_rng(i), 512) for i in range(6)]
    prepared = [prepare_image(config, img) for img in normal]  # tiles (or the resized image)
    train_cfg = TrainConfig(epochs=1, batch_size=4, positions_per_image=64, patience=0)
    result = fit(build_extractor(config), config, train_cfg, prepared[:4])
    cal = calibrate(result.model, prepared[4:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    slug = name.replace(" ", "_").replace("@", "at")
    models_uri = str(work / "models" / slug)
    save_model(result.model, work / "trained" / slug, cal)
    registry.publish(work / "trained" / slug, models_uri, LINE)
    return models_uri


def _batch(data: bytes, geometry):
    """One listing row read and decoded by the job's own stages."""
    import pyarrow as pa

    from pipeline.io_stages import DecodeConfig, decode_batch

    table = pa.table(
        {
            "image_id": ["big"],
            "image_uri": ["memory://big.png"],
            "product_line": [LINE],
            "captured_at": pa.nulls(1, pa.timestamp("us", tz="UTC")),
            "shard": pa.array([0], pa.int32()),
            "status": ["ok"],
            "error_reason": pa.nulls(1, pa.string()),
            "error": pa.nulls(1, pa.string()),
            "data": pa.array([data], pa.large_binary()),
        }
    )
    return decode_batch(table, DecodeConfig({LINE: geometry}, 64_000_000))


def measure(models_uri: str, image_path: str, out: str, threads: int, tile_batch: int) -> dict:
    """In this (fresh) process: load the actor, then one measured call on the big image."""
    import numpy as np
    import torch

    from dfr_core.artifact_meta import read_model_metadata
    from pipeline import registry
    from pipeline.score_stages import ScoringActor
    from pipeline.scoring_config import ScoringConfig

    torch.set_num_threads(threads)
    version = registry.latest_version(models_uri, LINE)
    cache = os.path.join(out, "cache")
    geometry = read_model_metadata(registry.fetch(models_uri, LINE, version, cache)).model_config
    config = ScoringConfig(
        models_uri=models_uri, models={LINE: version}, cache_dir=cache, options=None,
        output_uri=out, run_date=DATE, run_id="tile-memory", masks="all", heatmaps=True,
        torch_threads=threads, write_threads=8, tile_batch=tile_batch,
    )  # fmt: skip
    actor = ScoringActor(config)
    side = geometry.input_hw[0]
    if geometry.tile is not None:  # one tile after the scale
        side = int(np.ceil(geometry.tile / geometry.tile_scale))
    warm = _batch(_png(np.full((side, side, 3), 120, np.uint8)), geometry)
    actor(warm)  # loads the model and runs it once
    batch = _batch(Path(image_path).read_bytes(), geometry)
    tiles = batch.column("tiles")[0].as_py()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM (the peak) to the current RSS
    t0 = time.perf_counter()
    result = actor(batch)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    row = result.to_pylist()[0]
    return {
        "status": row["status"] if row["status"] == "ok" else row["error_reason"],
        "tiles": tiles,
        "loaded_mb": round(before / 1024),
        "peak_above_mb": round((peak - before) / 1024),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the actor")
    parser.add_argument("--out", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--case", action="append", choices=list(CASES), help="default: all")
    parser.add_argument(
        "--tile-batch", type=int, default=32, help="tiles per backbone pass (the job's batch size)"
    )
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.threads, args.tile_batch)))
        return
    work = Path(args.out or tempfile.mkdtemp(prefix="tile-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"load average: {os.getloadavg()}", flush=True)
    images: dict[int, str] = {}
    rows = []
    for name in args.case or list(CASES):
        fields, side = CASES[name]
        if side not in images:
            images[side] = str(work / f"image_{side}.png")
            Path(images[side]).write_bytes(_png(_texture(side)))
        models_uri = _train(work, name, {"layers": (), **fields})
        cmd = [sys.executable, __file__, "--threads", str(args.threads)]
        cmd += ["--tile-batch", str(args.tile_batch)]
        cmd += ["--measure", models_uri, images[side], str(work / "out" / name.replace(" ", "_"))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{name}: measurement failed\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append((name, result))
        print(f"{name}: {result}", flush=True)
    print()
    print("| case | tiles | status | loaded actor RSS (MB) | peak above it in the call (MB) | s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['tiles']} | {r['status']} | {r['loaded_mb']} | "
            f"{r['peak_above_mb']} | {r['seconds']} |"
        )
    print(f"\nload average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
