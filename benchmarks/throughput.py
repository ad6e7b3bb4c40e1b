"""Throughput and memory of the whole scoring job vs the bare model, in the same run.

    python benchmarks/throughput.py --n 1000 --n 10000

For each N, one fresh subprocess (so peak memory is per case, not carried over) measures:
- bare: read + decode + resize + model forward (the shared batched forward of
  dfr_core.inference) in one plain process of its own, same batch size, ``--bare-threads``
  torch threads (default: every CPU), before and after the jobs (averaged);
- job-local: run_score_job over a Parquet listing of N local files (Ray Data, local Ray);
- job-s3: the same listing with the images on a local moto S3 server;
- bare-s3 (since stop 32): the bare loop reading the S3 job's objects from the same server
  with the job's client (pyarrow) on 16 threads, so the S3 job is also compared with a bare
  loop that pays the same server; the bare loops run local, S3 before the jobs and S3, local
  after them.

The job runs with the scoring CLI's defaults unless flags are given: actors, CPUs per actor,
decode CPUs and torch threads sized from the cluster (pipeline.resources; printed).

Job figures are whole-job images/s (scoring stage wall time: actor start, model load,
streaming, Parquet and masks included). Wall time on a shared machine depends on what else
runs, so the CPU seconds per image of the bare loop and of the whole job (every Ray process
included) are reported too: their ratio ("CPU efficiency") is the pipeline's overhead,
whatever the contention.

The moto server runs in this script's first process, on the job's cores; its CPU per object
served during a case (the S3 job's and the S3 bare loops' reads) is printed after the
per-process lines.

Memory, sampled every 0.25 s during each job: the driver's peak RSS, and the peaks of the summed
RSS and of the summed PSS of the driver plus every Ray process it started. The RSS sum counts the
plasma store's shared pages once per process that maps them (an overstatement); the PSS sum
splits shared pages among their processes, so it counts each page once: the tree's real
footprint. The case's driver imports no torch (the bare loop runs in its own process), like the
real ``dfr-pipeline score`` driver.

Model: mobilenet_v2 (offline ImageNet weights) with its default layers at ``--size`` px, a head
trained briefly on synthetic images. Images are ``--image-px`` square PNGs from
pipeline.demo.synthetic (a pool of distinct images written under N names, so setup stays fast).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LINE = "metal_plate"
POOL = 64  # distinct images; file i is a copy of pool[i % POOL]


def _proc_kb(path: str, field: str) -> int:
    """One "<field>: <n> kB" line of a /proc file (0 once the process has gone)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _rss_kb(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/status", "VmRSS:")


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (the plasma store's) split among the processes
    mapping them, so the sum over a tree counts each page once."""
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                parent = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (0 once it has gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return 0


def _role(pid: int, driver: int) -> str:
    """What a process of the tree is, for the CPU breakdown: the driver, a Ray worker by the
    task or actor it runs now (Ray sets the process title to ``ray::<name>``), or the
    executable of a Ray system process (raylet, gcs_server, agents)."""
    if pid == driver:
        return "driver"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return "gone"
    title = argv[0].decode(errors="replace")
    if title.startswith("ray::"):
        return title.split()[0][:60]
    script = next((a.decode(errors="replace") for a in argv[1:2] if a.endswith(b".py")), "")
    return os.path.basename(script or title.split()[0] if title else "?")


class ProcessTree:
    """Samples this process and its descendants (every Ray process it started): the peak of
    their summed RSS and the CPU time they used while sampling (CPU seconds are what a shared,
    oversubscribed machine cannot distort, unlike wall time), also by process role (`_role`):
    each sample's CPU ticks go to the role the process had at that sample.

    Sampling runs in this (the driver's) process and is not free: reading a Ray process's
    ``smaps_rollup`` (PSS) costs ~2 ms of kernel time, so PSS is read every ``pss_every``-th
    sample only, and the sampler's own CPU (its thread's time) is reported as its own role and
    taken out of the driver's and the total CPU.
    """

    def __init__(self, interval: float = 0.5, pss_every: int = 4) -> None:
        self.interval = interval
        self.pss_every = pss_every
        self._samples = 0
        self.sampler_cpu_s = 0.0
        self.peak_kb = 0
        self.pss_peak_kb = 0
        self.driver_peak_kb = 0
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self.ticks_by_role: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, first: bool = False) -> None:
        start = time.thread_time()
        pids = _descendants(os.getpid())
        self.peak_kb = max(self.peak_kb, sum(_rss_kb(pid) for pid in pids))
        if self._samples % self.pss_every == 0:
            self.pss_peak_kb = max(self.pss_peak_kb, sum(_pss_kb(pid) for pid in pids))
        self._samples += 1
        self.driver_peak_kb = max(self.driver_peak_kb, _rss_kb(os.getpid()))
        for pid in pids:
            ticks = _cpu_ticks(pid)
            self._first.setdefault(pid, ticks if first else 0)
            previous = self._last.get(pid, self._first[pid])
            self._last[pid] = max(previous, ticks)
            role = _role(pid, os.getpid())
            self.ticks_by_role[role] = self.ticks_by_role.get(role, 0) + self._last[pid] - previous
        self.sampler_cpu_s += time.thread_time() - start

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def cpu_seconds(self) -> float:
        """The tree's CPU seconds without the sampler's own."""
        ticks = sum(self._last[pid] - self._first[pid] for pid in self._last)
        return ticks / os.sysconf("SC_CLK_TCK") - self.sampler_cpu_s

    def cpu_ms_by_role(self, images: int) -> dict[str, float]:
        """CPU milliseconds per image by process role, largest first (roles under 0.5 ms
        summed as "other"); the sampler apart from the driver."""
        hz = os.sysconf("SC_CLK_TCK")
        ticks_by_role = dict(self.ticks_by_role)
        sampler = self.sampler_cpu_s * hz
        ticks_by_role["driver"] = ticks_by_role.get("driver", 0) - sampler
        ticks_by_role["(benchmark sampler, in the driver)"] = sampler
        scale = 1000 / hz / max(images, 1)
        out: dict[str, float] = {}
        for role, ticks in sorted(ticks_by_role.items(), key=lambda kv: -kv[1]):
            ms = ticks * scale
            key = role if ms >= 0.5 else "other"
            out[key] = round(out.get(key, 0.0) + ms, 1)
        return out

    def __enter__(self) -> ProcessTree:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# --------------------------------------------------------------------------------------------
# setup (parent)
# --------------------------------------------------------------------------------------------


def _train(root: Path, size: int) -> str:
    import numpy as np

    from dfr_core.artifact import save_model
    from dfr_core.calibrate import calibrate
    from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
    from dfr_core.model import build_extractor
    from dfr_core.train import fit
    from pipeline import registry
    from pipeline.demo.synthetic import render_normal

    config = ModelConfig(backbone="mobilenet_v2", image_size=size)
    train = TrainConfig(epochs=3, batch_size=4, positions_per_image=256, patience=0)
    images = np.stack([render_normal(LINE, np.random.default_rng(i), size) for i in range(12)])
    result = fit(build_extractor(config), config, train, images[:9])
    calibration = calibrate(result.model, images[9:], CalibrationConfig())
    save_model(result.model, root / "trained", calibration)
    models = str(root / "models")
    registry.publish(root / "trained", models, LINE)
    return models


def _pool(image_px: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    from pipeline.demo.synthetic import render_defect, render_normal

    out = []
    for i in range(POOL):
        rng = np.random.default_rng(10_000 + i)
        img = render_defect(LINE, "spot", rng, image_px)[0] if i % 16 == 0 else None
        img = img if img is not None else render_normal(LINE, rng, image_px)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _write_archive(base: str, n: int, pool: list[bytes], listing: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline import storage

    uris = [f"{base}/{LINE}/img_{i:06d}.png" for i in range(n)]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda i: storage.write_bytes_atomic(uris[i], pool[i % POOL]), range(n)))
    pq.write_table(pa.table({"image_uri": uris, "product_line": [LINE] * n}), listing)


# --------------------------------------------------------------------------------------------
# one case (child)
# --------------------------------------------------------------------------------------------


def _batch_reader(uri: str):  # noqa: ANN202
    """How the bare loop reads a batch: local files one plain read each, as before; S3 objects
    with the job's client (pyarrow: a HEAD and a GET each) on the job's 16 read threads, as a
    hand-written loop against S3 would, so that the S3 server's latency is not serialised."""
    from pipeline import storage

    if not uri.startswith("s3://"):
        return lambda uris: [storage.read_bytes(u) for u in uris]

    def read(u: str) -> bytes:
        fs, path = storage.pyarrow_fs(u)
        with fs.open_input_stream(path) as stream:
            return stream.read()

    pool = ThreadPoolExecutor(16)
    return lambda uris: list(pool.map(read, uris))


def _bare(models: str, listing: Path, batch: int, limit: int, cache: str) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from dfr_core.artifact import load_model
    from dfr_core.decode import decode_image
    from dfr_core.inference import forward_batch, prepare_extractor
    from dfr_core.resize import resize_image
    from pipeline import registry

    loaded = load_model(registry.fetch(models, LINE, registry.latest_version(models, LINE), cache))
    model, size = loaded.model.eval(), loaded.model.config.image_size
    uris = pq.read_table(listing).column("image_uri").to_pylist()[:limit]
    prepare_extractor(model.extractor, torch.device("cpu"), model.precision)  # as the actor does
    read_all = _batch_reader(uris[0])
    t0, cpu0 = time.perf_counter(), time.process_time()
    decode_cpu = 0.0
    for i in range(0, len(uris), batch):
        c0 = time.process_time()
        arrays = [resize_image(decode_image(data), size) for data in read_all(uris[i : i + batch])]
        decode_cpu += time.process_time() - c0
        forward_batch(model, np.stack(arrays))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {
        "images": len(uris),
        "seconds": round(seconds, 2),
        "ips": round(len(uris) / seconds, 2),
        "cpu_s_per_image": round(cpu / len(uris), 4),
        "cpu_ms_per_image_read_decode": round(1000 * decode_cpu / len(uris), 1),
        "cpu_ms_per_image_model": round(1000 * (cpu - decode_cpu) / len(uris), 1),
    }


def _config(models: str, listing: Path, out: str, args: argparse.Namespace, cache: str):  # noqa: ANN202
    from pipeline.score_job import ScoreJobConfig

    return ScoreJobConfig(
        models_uri=models,
        input_uri=str(listing),
        output_uri=out,
        run_date="2024-05-01",
        batch_size=args.batch,
        min_actors=args.actors,
        max_actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        decode_cpus=args.decode_cpus,
        torch_threads=args.torch_threads,
        cache_dir=cache,
        quiet=True,
    )


def _job(models: str, listing: Path, out: str, args: argparse.Namespace, cache: str) -> dict:
    from pipeline.score_job import run_score_job

    config = _config(models, listing, out, args, cache)
    with ProcessTree() as tree:
        t0 = time.perf_counter()
        summary = run_score_job(config)
        total = time.perf_counter() - t0
    return {
        "images": summary.counts["rows"],
        "ok": summary.counts["ok"],
        "seconds": round(summary.seconds, 2),
        "total_seconds": round(total, 2),
        "ips": round(summary.images_per_second, 2),
        "cpu_s_per_image": round(tree.cpu_seconds / summary.counts["rows"], 4),
        "cpu_ms_per_image_by_process": tree.cpu_ms_by_role(summary.counts["rows"]),
        "tree_peak_mb": round(tree.peak_kb / 1024),
        "tree_pss_peak_mb": round(tree.pss_peak_kb / 1024),
        "driver_peak_mb": round(tree.driver_peak_kb / 1024),
    }


def _run_child(cmd: list[str], tag: str, what: str) -> dict:
    """Run this script as a child; the JSON of its "<tag> " line (stop with its output if none)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = [x for x in proc.stdout.splitlines() if x.startswith(tag + " ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    return json.loads(line[0][len(tag) + 1 :])


def _bare_in_child(args: argparse.Namespace, listing: Path, limit: int) -> dict:
    """The bare loop in its own process: the job's driver (this process) stays torch-free, as
    the real ``dfr-pipeline score`` driver is (pipeline.driver_exec)."""
    cmd = [sys.executable, __file__, "--bare-case", str(limit), "--models", args.models]
    cmd += ["--work", args.work, "--batch", str(args.batch), "--listing", str(listing)]
    cmd += ["--bare-threads", str(args.bare_threads or os.cpu_count())]
    return _run_child(cmd, "BARE", "bare loop")


def bare_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.bare_threads)
    cache = str(Path(args.work) / "cache")
    result = _bare(args.models, Path(args.listing), args.batch, args.bare_case, cache)
    print("BARE " + json.dumps(result), flush=True)


def _bare_mean(before: dict, after: dict, images: int) -> dict:
    """One bare figure from the runs before and after the jobs (other load biases neither)."""
    return {
        "images": images,
        "ips_before": before["ips"],
        "ips_after": after["ips"],
        "ips": round((before["ips"] + after["ips"]) / 2, 2),
        "cpu_s_per_image": round((before["cpu_s_per_image"] + after["cpu_s_per_image"]) / 2, 4),
        **{
            key: round((before[key] + after[key]) / 2, 1)
            for key in ("cpu_ms_per_image_read_decode", "cpu_ms_per_image_model")
        },
    }


def child(args: argparse.Namespace) -> None:
    """One case: bare loops before, both jobs (this process is their driver: no torch), bare
    loops after. The bare loop reads local files ("bare") and, since stop 32, the S3 job's
    objects from the same server ("bare_s3"), in ABBA order."""
    import ray

    work = Path(args.work)
    cache = str(work / "cache")
    listings = {source: work / f"{source}-{args.case_n}.parquet" for source in ("local", "s3")}
    limit = min(args.case_n, args.bare_limit)
    result: dict = {"n": args.case_n}
    before = {source: _bare_in_child(args, listings[source], limit) for source in ("local", "s3")}
    # Ray started as the CLI starts its private local Ray (its object store size included)
    from pipeline.ray_runtime import init_ray

    init_ray("local", num_cpus=os.cpu_count())
    store_mib = ray.cluster_resources()["object_store_memory"] / 2**20
    from pipeline.resources import ClusterShape, plan_resources
    from pipeline.score_job import resource_request

    config = _config(args.models, listings["local"], "-", args, cache)
    plan = plan_resources(resource_request(config), ClusterShape.from_ray(), config.max_pixels)
    result["resources"] = f"{plan.describe()}; object store {store_mib:.0f} MiB"
    for source in ("local", "s3"):
        out = str(work / f"out-{source}-{args.case_n}")
        result[f"job_{source}"] = _job(args.models, listings[source], out, args, cache)
    result["driver_imported_torch"] = "torch" in sys.modules
    ray.shutdown()
    after = {source: _bare_in_child(args, listings[source], limit) for source in ("s3", "local")}
    result["bare"] = _bare_mean(before["local"], after["local"], limit)
    result["bare_s3"] = _bare_mean(before["s3"], after["s3"], limit)
    for source in ("local", "s3"):
        job = result[f"job_{source}"]
        job["ratio"] = round(job["ips"] / result["bare"]["ips"], 3)
        # bare CPU per image / job CPU per image: 1.0 means the pipeline adds no CPU work
        job["cpu_efficiency"] = round(result["bare"]["cpu_s_per_image"] / job["cpu_s_per_image"], 3)
    # the S3 job against a bare loop that reads the same objects from the same server
    result["job_s3"]["ratio_bare_s3"] = round(result["job_s3"]["ips"] / result["bare_s3"]["ips"], 3)
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# main (parent)
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, action="append", help="images per case (repeatable)")
    parser.add_argument("--size", type=int, default=256, help="model input size")
    parser.add_argument("--image-px", type=int, default=320, help="source image size")
    parser.add_argument("--batch", type=int, default=32, help="the scoring job's default")
    parser.add_argument("--actors", type=int, default=None, help="default: sized (fixed pool)")
    parser.add_argument("--cpus-per-actor", type=float, default=None, help="default: sized")
    parser.add_argument("--decode-cpus", type=float, default=None, help="default: sized")
    parser.add_argument("--torch-threads", type=int, default=None, help="per actor; sized")
    parser.add_argument("--bare-threads", type=int, default=None, help="default: all CPUs")
    parser.add_argument(
        "--bare-limit",
        type=int,
        default=1000,
        help="images for the bare measurement (steady state: no need for all N)",
    )
    parser.add_argument("--work", default=None, help="work directory (default: a temp dir)")
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--case-n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--listing", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_case:
        bare_child(args)
        return
    if args.case_n:
        child(args)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["DFR_S3_ENDPOINT_URL"] = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=os.environ["DFR_S3_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    work = Path(args.work or tempfile.mkdtemp(prefix="dfr-throughput-"))
    if not args.work:  # its archives: 60 MB per 1,000 images, gone however the run ends
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    models = _train(work, args.size)
    pool = _pool(args.image_px)
    print(f"setup: model trained, pool rendered in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for n in args.n or [1000]:
        t0 = time.perf_counter()
        _write_archive(str(work / f"archive-{n}"), n, pool, work / f"local-{n}.parquet")
        _write_archive(f"s3://bench/archive-{n}", n, pool, work / f"s3-{n}.parquet")
        print(f"n={n}: archives written in {time.perf_counter() - t0:.0f} s", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--case-n",
            str(n),
            "--models",
            models,
            "--work",
            str(work),
            "--batch",
            str(args.batch),
            "--bare-limit",
            str(args.bare_limit),
        ]
        for flag in ("actors", "cpus_per_actor", "decode_cpus", "torch_threads", "bare_threads"):
            if getattr(args, flag) is not None:
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        cpu0 = time.process_time()
        results.append(_run_child(cmd, "RESULT", f"case n={n}"))
        # The moto server runs in this process, on the same cores as the job: its CPU during
        # the case is what serving the S3 job's and the two S3 bare loops' reads cost (the
        # other bare loops and the local job read local files), taken from the job on this
        # machine, and from no job against S3; per object served.
        served = n + 2 * results[-1]["bare_s3"]["images"]
        results[-1]["s3_server_cpu_ms_per_image"] = round(
            1000 * (time.process_time() - cpu0) / served, 1
        )
        print(json.dumps(results[-1]), flush=True)
    server.stop()

    print(
        f"\nmobilenet_v2 default layers, {args.size} px, batch {args.batch}, "
        f"{os.cpu_count()} CPUs, source images {args.image_px} px PNG, bare: "
        f"{args.bare_threads or os.cpu_count()} torch threads; job: {results[0]['resources']}"
    )
    print(
        "| images | bare img/s local / S3 | job local img/s (ratio) "
        "| job S3 img/s (ratio to bare local; to bare S3) "
        "| CPU ms/img bare / local / S3 | CPU efficiency local / S3 "
        "| peak RSS tree local / S3 (MB) | peak PSS tree local / S3 (MB) "
        "| driver peak local / S3 (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        bare, lo, s3 = r["bare"], r["job_local"], r["job_s3"]
        cpu = [round(1000 * x["cpu_s_per_image"]) for x in (bare, lo, s3)]
        print(
            f"| {r['n']} | {bare['ips']} / {r['bare_s3']['ips']} | {lo['ips']} ({lo['ratio']:.0%}) "
            f"| {s3['ips']} ({s3['ratio']:.0%}; {s3['ratio_bare_s3']:.0%}) "
            f"| {cpu[0]} / {cpu[1]} / {cpu[2]} "
            f"| {lo['cpu_efficiency']:.0%} / {s3['cpu_efficiency']:.0%} "
            f"| {lo['tree_peak_mb']} / {s3['tree_peak_mb']} "
            f"| {lo['tree_pss_peak_mb']} / {s3['tree_pss_peak_mb']} "
            f"| {lo['driver_peak_mb']} / {s3['driver_peak_mb']} |"
        )
    print("\nCPU ms per image by process (where the job's extra CPU goes):")
    for r in results:
        bare = r["bare"]
        print(
            f"n={r['n']} bare: read+decode+resize {bare['cpu_ms_per_image_read_decode']}, "
            f"model {bare['cpu_ms_per_image_model']}"
        )
        for source in ("local", "s3"):
            print(f"n={r['n']} job {source}: {r[f'job_{source}']['cpu_ms_per_image_by_process']}")
        b3 = r["bare_s3"]
        print(
            f"n={r['n']} bare S3: read+decode+resize {b3['cpu_ms_per_image_read_decode']}, "
            f"model {b3['cpu_ms_per_image_model']}"
        )
        served = r["s3_server_cpu_ms_per_image"]
        print(f"n={r['n']} S3 server (moto, same cores), per object served: {served}")


if __name__ == "__main__":
    main()
