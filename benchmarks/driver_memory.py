"""Driver peak memory and rows/s of a real ``dfr-pipeline score`` over a listing of missing files.

Every row of the generated listing names a file that does not exist, so every row becomes a
``not_found`` error row: the run exercises listing, sharding, Ray Data, shard writing and the
commit without decoding an image. The run is the real CLI in a child process (with
``--max-error-fraction 1``, so a run whose rows are all errors still exits 0 and is measured);
this script polls the child's ``/proc/<pid>/status`` and reports its peak RSS (``VmHWM``) and
the peaks of its anonymous and shared (object-store pages it mapped) parts.

    python benchmarks/driver_memory.py --rows 1000000
    python benchmarks/driver_memory.py --rows 10000000 --plan-only   # listing + planning only

``dfr-pipeline score`` re-executes itself torch-free (pipeline.driver_exec.reexec_scoring):
``VmHWM`` is that of the driver after the re-exec; ``launcher_peak_mb`` (the child's
``ru_maxrss``) also covers the CLI start-up before it, which imports torch and is released by
the re-exec. ``--plan-only`` runs, in a torch-free child, what the driver does per row before
any Ray work (read the listing in chunks, sort, shard, fingerprint, pin models, build every
wave's blocks once). Prints one JSON line. The model and the listing are made in a separate
process first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = "metal_plate"


def _listing(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    chunk = 500_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        uris = [
            f"/nonexistent/archive/{LINE}/2024-05-01/img_{i:09d}.png"
            for i in range(start, start + n)
        ]
        table = pa.table({"image_uri": uris, "product_line": pa.array([LINE] * n)})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()


def prepare(work: Path, rows: int) -> None:
    """A tiny published model and the listing (run in its own process: not measured)."""
    from test_faults import publish_tiny_model

    publish_tiny_model(str(work / "models"), LINE, work / "trained")
    _listing(work / "listing.parquet", rows)


_FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def _status(pid: int) -> dict[str, int]:
    """The memory fields of /proc/<pid>/status, in MB ({} once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name in _FIELDS:
            out[name] = int(value.split()[0]) // 1024
    return out


def _watch(command: list[str], env: dict[str, str]) -> dict[str, object]:
    """Run ``command``; peaks of its memory fields (polled) and its wall time."""
    t0 = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    peaks: dict[str, int] = {}
    while child.poll() is None:
        for name, value in _status(child.pid).items():
            peaks[name] = max(peaks.get(name, 0), value)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    out = child.stdout.read() if child.stdout else ""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if child.returncode != 0:
        raise SystemExit(f"{command[:3]} exited {child.returncode}:\n{out}")
    return {
        "wall_s": round(wall, 1),
        "driver_peak_rss_mb": peaks.get("VmHWM"),
        "driver_peak_anon_mb": peaks.get("RssAnon"),
        "driver_peak_shmem_mb": peaks.get("RssShmem"),
        "launcher_peak_mb": round(usage.ru_maxrss / 1024),
        "stdout": out,
    }


def plan(work: Path, args: argparse.Namespace) -> None:
    """The driver's per-row work without Ray (run in a torch-free child by measure)."""
    from pipeline import listing as listing_mod
    from pipeline import score_job
    from pipeline.score_job import ScoreJobConfig

    config = ScoreJobConfig(
        models_uri=str(work / "models"),
        input_uri=str(work / "listing.parquet"),
        output_uri=str(work / "out"),
        run_date="2024-05-01",
        shard_size=args.shard_size,
        cache_dir=str(work / "cache"),
    )
    t0 = time.perf_counter()
    listing = listing_mod.load_listing(config.input_uri, (), config.shard_size)
    t_list = time.perf_counter()
    models = {
        ln: score_job.resolve_model(config, ln, None, check_head=False)
        for ln in listing.product_lines
    }
    blocks = 0
    for wave in score_job.waves(listing.shards):
        blocks += len(score_job.wave_blocks(listing, wave, models, score_job.MAX_BLOCK_ROWS))
    assert "torch" not in sys.modules
    print(
        json.dumps(
            {
                "listing_s": round(t_list - t0, 1),
                "plan_s": round(time.perf_counter() - t0, 1),
                "shards": len(listing.shards),
                "blocks": blocks,
                "spilled": listing.spilled,
            }
        )
    )


def measure(work: Path, args: argparse.Namespace) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result: dict[str, object] = {"rows": args.rows, "plan_only": args.plan_only}
    if args.plan_only:
        command = [sys.executable, __file__, *sys.argv[1:], "--work", str(work), "--step", "plan"]
        watched = _watch(command, env)
        result.update(json.loads(str(watched.pop("stdout")).strip().splitlines()[-1]))
        result.update(watched)
        return result
    command = [
        str(Path(sys.executable).with_name("dfr-pipeline")), "score",
        "--models-uri", str(work / "models"), "--input", str(work / "listing.parquet"),
        "--output", str(work / "out"), "--run-date", "2024-05-01",
        "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
        "--cpus-per-actor", "0.5", "--decode-cpus", "0.5", "--masks", "none",
        "--max-error-fraction", "1", "--cache-dir", str(work / "cache"), "--quiet",
    ]  # fmt: skip
    watched = _watch(command, env)
    out = str(watched.pop("stdout"))
    assert f"{args.rows} listed" in out and f"not_found={args.rows}" in out, out
    scoring = re.search(r"this invocation: (\d+) images in ([\d.]+) s", out)
    assert scoring is not None, out
    result.update(watched)
    result.update(
        rows_per_s=round(args.rows / float(watched["wall_s"])),  # type: ignore[arg-type]
        scoring_s=float(scoring.group(2)),
        scoring_rows_per_s=round(int(scoring.group(1)) / float(scoring.group(2))),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("prepare", "measure", "plan"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]
    if args.step == "prepare":
        prepare(Path(args.work), args.rows)
        return
    if args.step == "plan":
        plan(Path(args.work), args)
        return
    if args.step == "measure":
        print(json.dumps(measure(Path(args.work), args)))
        shutil.rmtree(args.work, ignore_errors=True)
        return
    work = Path(tempfile.mkdtemp(prefix="dfr-driver-mem-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for step in ("prepare", "measure"):
        command = [sys.executable, __file__, *sys.argv[1:], "--work", str(work), "--step", step]
        subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    main()
