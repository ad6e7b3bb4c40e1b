"""Reliability figures: faults injected into real scoring runs, and the hostile-input corpus.

Runs a compact version of tests/integration/test_faults.py and test_bad_inputs_job.py on a local
Ray instance and an in-process moto S3 server (no network, no GPU needed), then prints two
tables: per fault kind, how many were injected, whether the run survived, and rows expected /
found / lost / duplicated (lost and duplicates must be 0); and per hostile input kind, the row
status and reason it became.

    python benchmarks/reliability.py [--images 48]

Why a separate script from the tests: the tests assert the contracts; this prints the numbers
that go into BENCHMARKS.md, from one command anyone can rerun.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECRET = "reliability-benchmark-secret"
DATE = "2024-09-01"
LINE = "metal_plate"


def _load(path: Path, name: str) -> ModuleType:
    """Test helpers are plain files (tests are not a package): load them by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rows(output: str, expected: int) -> dict[str, int]:
    from pipeline import outputs

    df = outputs.read_scores(output)
    unique = int(df["image_uri"].nunique()) if len(df) else 0
    return {
        "expected": expected,
        "found": len(df),
        "lost": expected - unique,
        "duplicates": len(df) - unique,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48, help="images per fault scenario")
    args = parser.parse_args()
    n = args.images - args.images % 4

    # Environment first: fake credentials (scanned for afterwards), quiet Ray.
    os.environ.update(
        AWS_ACCESS_KEY_ID="reliability-key-id",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_CONFIG_FILE=os.devnull,
        RAY_USAGE_STATS_ENABLED="0",
    )
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    import ray
    from moto.server import ThreadedMotoServer

    from pipeline import outputs, storage
    from pipeline.score_job import ScoreJobConfig, run_score_job
    from pipeline.storage import StorageOptions

    proxy_mod = _load(REPO / "tests" / "integration" / "s3_fault_proxy.py", "s3_fault_proxy")
    faults = _load(REPO / "tests" / "integration" / "test_faults.py", "dfr_faults_helpers")
    corpus = _load(REPO / "tests" / "unit" / "test_bad_inputs.py", "dfr_corpus").hostile_corpus()

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    upstream = f"http://127.0.0.1:{port}"
    os.environ["DFR_S3_ENDPOINT_URL"] = upstream
    import boto3

    boto3.client("s3", endpoint_url=upstream).create_bucket(Bucket="reliability")
    bucket = "s3://reliability"
    work = Path(tempfile.mkdtemp(prefix="dfr-reliability-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # however the run ends
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    t0 = time.perf_counter()
    fault_rows: list[tuple[str, int, bool, dict[str, int]]] = []
    try:
        models = f"{bucket}/models"
        faults.publish_tiny_model(models, LINE, work / "trained")
        images = faults.upload_images(f"{bucket}/archive", LINE, n)

        def config(output: str, **kw: Any) -> ScoreJobConfig:
            base = dict(
                models_uri=models,
                input_uri=f"{bucket}/archive",
                output_uri=output,
                run_date=DATE,
                batch_size=4,
                shard_size=4,
                cpus_per_actor=0.5,
                decode_cpus=0.5,
                read_threads=2,
                cache_dir=str(work / "cache"),
                quiet=True,
                max_error_fraction=1.0,
            )
            return ScoreJobConfig(**{**base, **kw})

        slow = proxy_mod.FaultPlan(delay_s=0.15, delay_match=faults._is_image_get)

        # 1. scoring actor SIGKILLed after the first committed shard
        out = f"{bucket}/out-actor"
        with proxy_mod.fault_proxy(upstream, slow) as proxy:
            job = faults._JobThread(config(out, storage=StorageOptions(proxy.endpoint_url)))
            job.start()
            faults._wait_for(lambda: faults._markers(out) >= 1 or not job.is_alive(), "shard")
            pid = faults._find_process("ScoringActor")
            killed = pid is not None and job.is_alive()
            if killed:
                os.kill(pid, signal.SIGKILL)
            survived = job.result().counts["rows"] == n
        fault_rows.append(("scoring actor SIGKILL", int(killed), survived, _rows(out, n)))

        # 2. driver (dfr-pipeline score) SIGKILLed after the first shard, then rerun
        out = f"{bucket}/out-driver"
        with proxy_mod.fault_proxy(upstream, slow) as proxy:
            env = {**os.environ, "DFR_S3_ENDPOINT_URL": proxy.endpoint_url, "RAY_ADDRESS": ""}
            command = [str(Path(sys.executable).with_name("dfr-pipeline")), "score",
                       "--models-uri", models, "--input", f"{bucket}/archive", "--output", out,
                       "--run-date", DATE, "--shard-size", "4", "--batch-size", "4", "--quiet",
                       "--cpus-per-actor", "0.5", "--decode-cpus", "0.5",
                       "--cache-dir", str(work / "cache")]  # fmt: skip
            driver = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            faults._wait_for(lambda: faults._markers(out) >= 1 or driver.poll() is not None, "")
            killed = driver.poll() is None
            if killed:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(60)
        visible_after_kill = len(outputs.read_scores(out))
        summary = run_score_job(config(out))
        survived = visible_after_kill == 0 and summary.skipped > 0 and summary.counts["rows"] == n
        fault_rows.append(("driver SIGKILL + rerun", int(killed), survived, _rows(out, n)))

        # 3. S3 transient errors (and two permanent ones) through the proxy
        out = f"{bucket}/out-s3"
        denied, missing = images[1], f"{bucket}/archive/{LINE}/missing.png"
        listing = f"{bucket}/listings/s3.csv"
        lines = [f"{u},{LINE}" for u in [*images, missing]]
        storage.write_text_atomic(listing, "image_uri,product_line\n" + "\n".join(lines) + "\n")
        plan = proxy_mod.FaultPlan(
            budget=12,
            every=3,
            match=lambda method, key: key.startswith("reliability"),
            denied_keys=frozenset({denied.removeprefix("s3://")}),
        )
        with proxy_mod.fault_proxy(upstream, plan) as proxy:
            summary = run_score_job(
                config(out, input_uri=listing, storage=StorageOptions(proxy.endpoint_url))
            )
            injected = dict(proxy.stats.injected)
        reasons = summary.counts["error_reasons"]
        rows = _rows(out, n + 1)
        for kind in ("slowdown", "internal", "reset"):
            label = {"slowdown": "S3 503 SlowDown", "internal": "S3 500 InternalError",
                     "reset": "S3 connection reset"}[kind]  # fmt: skip
            fault_rows.append((label, injected.get(kind, 0), summary.counts["ok"] == n - 1, rows))
        fault_rows.append(("S3 403 AccessDenied (permanent)", injected.get("denied", 0),
                           reasons.get("access_denied") == 1, rows))  # fmt: skip
        fault_rows.append(("S3 missing object (permanent)", 1, reasons.get("not_found") == 1, rows))

        # 4. the hostile corpus through the job
        for hostile in corpus:
            storage.write_bytes_atomic(f"{bucket}/corpus/{LINE}/{hostile.name}", hostile.data)
        out = f"{bucket}/out-corpus"
        run_score_job(config(out, input_uri=f"{bucket}/corpus", masks="all"))
        df = outputs.read_scores(out)
        got = {u.rsplit("/", 1)[1]: (s, r) for u, s, r in
               zip(df["image_uri"], df["status"], df["error_reason"], strict=True)}  # fmt: skip
        corpus_rows = _rows(out, len(corpus))

        # 5. the secret, anywhere in what the runs wrote
        client = boto3.client("s3", endpoint_url=upstream)
        leaks = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket="reliability"):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket="reliability", Key=obj["Key"])["Body"].read()
                leaks += SECRET.encode() in body
    finally:
        ray.shutdown()
        server.stop()

    print(f"Reliability ({n} images of 64 px per fault scenario, local Ray with 2 CPUs, moto S3;"
          f" {time.perf_counter() - t0:.0f} s)\n")  # fmt: skip
    print("| fault | injected | survived | rows expected | rows found | lost | duplicates |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for label, count, ok, r in fault_rows:
        print(f"| {label} | {count} | {'yes' if ok else 'NO'} | {r['expected']} | {r['found']} "
              f"| {r['lost']} | {r['duplicates']} |")  # fmt: skip
    print("\n| bad input | expected | got |")
    print("|---|---|---|")
    for hostile in corpus:
        want = "ok" if hostile.reason is None else f"error: {hostile.reason}"
        status, reason = got.get(hostile.name, ("missing", None))
        have = status if status == "ok" else f"{status}: {reason}"
        print(f"| {hostile.kind} (`{hostile.name}`) | {want} | {have} |")
    print(f"\ncorpus rows: expected {corpus_rows['expected']}, found {corpus_rows['found']}, "
          f"lost {corpus_rows['lost']}, duplicates {corpus_rows['duplicates']}")  # fmt: skip
    print(f"objects containing the S3 secret: {leaks}")


if __name__ == "__main__":
    main()
