"""Driver peak memory and rows/s for a scoring run over a listing of missing files.

Every row of the generated listing names a file that does not exist, so every row becomes a
``not_found`` error row: the run exercises listing, sharding, Ray Data, shard writing and the
commit without decoding an image. The scoring job runs in this process (this process *is* the
driver), so ``ru_maxrss`` of this process is the driver's peak RSS.

    python benchmarks/driver_memory.py --rows 1000000            # end to end
    python benchmarks/driver_memory.py --rows 10000000 --plan-only   # listing + planning only

``--plan-only`` stops after what the driver does per row before any Ray work (read the listing,
resolve ids, sort, shard, pin models, shard bookkeeping): the part whose memory grows with the
listing. Prints one JSON line. The model and the listing are made in a separate process first,
so the measured process holds only what the driver holds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def measure(work: Path, args: argparse.Namespace) -> dict[str, object]:
    from pipeline import listing as listing_mod
    from pipeline import score_job
    from pipeline.score_job import ScoreJobConfig, run_score_job

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = ScoreJobConfig(
        models_uri=str(work / "models"),
        input_uri=str(work / "listing.parquet"),
        output_uri=str(work / "out"),
        run_date="2024-05-01",
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        cpus_per_actor=0.5,
        decode_cpus=0.5,
        masks="none",
        cache_dir=str(work / "cache"),
        quiet=True,
        max_error_fraction=1.0,
    )
    t0 = time.perf_counter()
    result: dict[str, object] = {"rows": args.rows, "plan_only": args.plan_only}
    if args.plan_only:
        resolved = listing_mod.load_listing(config.input_uri, (), config.shard_size)
        t_list = time.perf_counter()
        models = {ln: score_job.resolve_model(config, ln, None) for ln in resolved.product_lines}
        table = score_job.apply_model_errors(resolved.table, models)
        slices = score_job.shard_slices(table)
        result.update(
            listing_s=round(t_list - t0, 1),
            plan_s=round(time.perf_counter() - t0, 1),
            shards=len(slices),
            table_mb=round(table.nbytes / 2**20),
        )
    else:
        summary = run_score_job(config)
        assert summary.counts["rows"] == args.rows, summary.counts
        assert summary.counts["error_reasons"] == {"not_found": args.rows}, summary.counts
        wall = time.perf_counter() - t0
        result.update(
            wall_s=round(wall, 1),
            rows_per_s=round(args.rows / wall),
            scoring_rows_per_s=round(args.rows / summary.timings["scoring_s"]),
            timings=summary.timings,
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result.update(driver_peak_rss_mb=round(peak), rss_after_imports_mb=round(base_rss))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--step", choices=("prepare", "measure"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]
    if args.step == "prepare":
        prepare(Path(args.work), args.rows)
        return
    if args.step == "measure":
        import pipeline.score_job  # noqa: F401  (imports first: torch, ray, pyarrow)

        print(json.dumps(measure(Path(args.work), args)))
        return
    work = Path(tempfile.mkdtemp(prefix="dfr-driver-mem-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for step in ("prepare", "measure"):
        command = [sys.executable, __file__, *sys.argv[1:], "--work", str(work), "--step", step]
        subprocess.run(command, check=True, env=env)


if __name__ == "__main__":
    main()
