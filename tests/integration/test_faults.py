"""Faults injected into real jobs on local Ray and the moto S3 server; each must be survived.

* a scoring actor's process killed mid-job: the job completes, one row per image;
* the driver (``dfr-pipeline score`` in a subprocess) killed with SIGKILL mid-run: readers see
  nothing, and a rerun of the same date resumes and ends with one row per image;
* S3 throttling (503 SlowDown), 500 InternalError and connection resets from a fault proxy:
  retried, the job completes; permanent errors (missing object, access denied) are error rows;
* training: a line whose images are all corrupt and a line whose task is killed fail alone,
  with a clear message, and the registry never shows a version for them.

Jobs are kept small (<= 60 images of 64 px, a tiny model, fractional CPUs). The proxy's
``delay_s`` slows image reads down so that "mid-job" does not depend on the machine's speed;
nothing asserts on timings.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3_fault_proxy import FaultPlan, fault_proxy

from dfr_core.artifact import save_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.train import fit
from pipeline import outputs, registry, storage
from pipeline.demo.synthetic import SyntheticSpec, render_normal, write_mvtec_dataset
from pipeline.score_job import ScoreJobConfig, ScoreSummary, run_score_job
from pipeline.storage import StorageOptions
from pipeline.train_job import ERROR, OK, TrainJobConfig, run_train_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

SIZE = 64
LINE = "metal_plate"
N_IMAGES = 48
DATE = "2024-06-01"
MODEL = ModelConfig(backbone="mobilenet_v2", layers=("features.1", "features.3"), image_size=SIZE)
TRAIN = TrainConfig(epochs=2, batch_size=4, positions_per_image=64, patience=0)
WAIT_S = 600.0  # upper bound of every wait loop (a hung job fails the test, never hangs it)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def publish_tiny_model(models_uri: str, line: str, workdir: Path) -> str:
    """Train, calibrate and publish a 64 px model for ``line``; returns the version."""
    normal = np.stack([render_normal(line, np.random.default_rng(i), SIZE) for i in range(8)])
    result = fit(build_extractor(MODEL), MODEL, TRAIN, normal[:6])
    cal = calibrate(result.model, normal[6:], CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    save_model(result.model, workdir / line, cal)
    return registry.publish(workdir / line, models_uri, line)


def upload_images(prefix: str, line: str, count: int, seed: int = 0) -> list[str]:
    """``count`` synthetic PNGs under ``prefix/line/``; returns their URIs."""
    uris = []
    for i in range(count):
        uri = f"{prefix}/{line}/{i:04d}.png"
        storage.write_bytes_atomic(uri, _png(render_normal(line, seed + i, SIZE)))
        uris.append(uri)
    return uris


@dataclass(frozen=True)
class World:
    bucket: str
    models_uri: str
    archive: str  # s3://bucket/archive, laid out <line>/<file>
    images: list[str]
    cache_dir: Path
    upstream: str  # the moto endpoint (the proxy forwards here)


@pytest.fixture(scope="module")
def world(s3_server: Any, ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    client = s3_server.client()
    name = "dfr-faults-test"
    client.create_bucket(Bucket=name)
    bucket = f"s3://{name}"
    tmp = tmp_path_factory.mktemp("faults")
    models = f"{bucket}/models"
    publish_tiny_model(models, LINE, tmp / "trained")
    images = upload_images(f"{bucket}/archive", LINE, N_IMAGES)
    return World(bucket, models, f"{bucket}/archive", images, tmp / "cache", s3_server.endpoint_url)


def _config(world: World, output: str, **changes: Any) -> ScoreJobConfig:
    base = ScoreJobConfig(
        models_uri=world.models_uri,
        input_uri=world.archive,
        output_uri=output,
        run_date=DATE,
        batch_size=4,
        shard_size=4,
        cpus_per_actor=0.5,
        max_actors=2,  # two actor start-ups per job, not three (the suite is CPU bound)
        decode_cpus=0.25,
        read_threads=2,
        masks="anomalous",
        cache_dir=str(world.cache_dir),
        quiet=True,
        max_error_fraction=0.5,
    )
    return replace(base, **changes)


def _is_image_get(method: str, key: str) -> bool:
    return method == "GET" and "/archive/" in key


def _markers(output: str) -> int:
    """Shard commit markers written so far (any run key), read directly from the server."""
    try:
        return len(storage.list_files(f"{output}/_shards", (".json",)))
    except FileNotFoundError:
        return 0


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def _descendants(root: int) -> list[int]:
    """PIDs of every process below ``root`` (from /proc), so a test only ever signals processes
    that it started itself, directly or through Ray."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _find_process(needle: str) -> int | None:
    for pid in _descendants(os.getpid()):
        if needle in _cmdline(pid):
            return pid
    return None


def _assert_one_row_per_image(output: str, expected_uris: list[str]) -> None:
    df = outputs.read_scores(output)
    assert len(df) == len(expected_uris)
    assert sorted(df["image_uri"]) == sorted(expected_uris)
    assert df["image_uri"].is_unique and df["image_id"].is_unique
    everything = outputs.read_scores(output, committed_only=False)
    assert len(everything) == len(expected_uris)  # no leftover files of the killed attempt


def _ray_state() -> str:
    """Resources, live actors and unfinished tasks: what a hung job was waiting for."""
    import ray
    from ray.util import state

    address = ray.get_runtime_context().gcs_address  # other Ray instances may run beside ours
    lines = [f"available: {ray.available_resources()}", f"total: {ray.cluster_resources()}"]
    for actor in state.list_actors(address, filters=[("state", "!=", "DEAD")], limit=50):
        lines.append(f"actor {actor.class_name} {actor.state} pid={actor.pid}")
    for task in state.list_tasks(address, filters=[("state", "!=", "FINISHED")], limit=50):
        lines.append(f"task {task.name} {task.state}")
    return "\n".join(lines)


class _JobThread(threading.Thread):
    """run_score_job in the background, so the test can inject a fault while it runs."""

    def __init__(self, config: ScoreJobConfig) -> None:
        super().__init__(daemon=True)
        self.config = config
        self.summary: ScoreSummary | None = None
        self.error: BaseException | None = None

    def diagnosis(self) -> str:
        """The job thread's stack and Ray's state, for the message of a hung job."""
        import traceback

        frame = sys._current_frames().get(self.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame else "(no frame)"
        try:
            ray_state = _ray_state()
        except Exception as exc:  # diagnosis only: never hide the real failure
            ray_state = f"(Ray state unavailable: {exc!r})"
        return f"job thread stack:\n{stack}\n{ray_state}"

    def run(self) -> None:
        try:
            self.summary = run_score_job(self.config)
        except BaseException as exc:  # re-raised by the test
            self.error = exc

    def result(self) -> ScoreSummary:
        self.join(WAIT_S)
        assert not self.is_alive(), f"the job did not finish\n{self.diagnosis()}"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


@pytest.mark.slow
def test_scoring_actor_killed_mid_job(world: World) -> None:
    output = f"{world.bucket}/out-actor-kill"
    plan = FaultPlan(delay_s=0.15, delay_match=_is_image_get)
    with fault_proxy(world.upstream, plan) as proxy:
        job = _JobThread(_config(world, output, storage=StorageOptions(proxy.endpoint_url)))
        job.start()
        _wait_for(lambda: _markers(output) >= 1 or not job.is_alive(), "a committed shard")
        pid = _find_process("ScoringActor")
        committed_at_kill = _markers(output)
        assert job.is_alive() and pid is not None, "the job must still be running"
        assert committed_at_kill < N_IMAGES // 4
        os.kill(pid, signal.SIGKILL)
        summary = job.result()

    assert _find_process("ScoringActor") != pid  # the actor really died (Ray replaced it)
    assert summary.counts["rows"] == summary.counts["ok"] == N_IMAGES
    assert summary.counts["errors"] == 0
    _assert_one_row_per_image(output, world.images)


@pytest.mark.slow
def test_driver_killed_then_rerun_resumes(world: World, tmp_path: Path) -> None:
    output = f"{world.bucket}/out-driver-kill"
    plan = FaultPlan(delay_s=0.3, delay_match=_is_image_get)
    with fault_proxy(world.upstream, plan) as proxy:
        env = {**os.environ, "DFR_S3_ENDPOINT_URL": proxy.endpoint_url, "RAY_ADDRESS": ""}
        command = [
            str(Path(sys.executable).with_name("dfr-pipeline")),
            "score",
            *("--models-uri", world.models_uri, "--input", world.archive, "--output", output),
            *("--run-date", DATE, "--shard-size", "4", "--batch-size", "4", "--quiet"),
            *("--cpus-per-actor", "0.5", "--decode-cpus", "0.5"),
            *("--cache-dir", str(world.cache_dir)),
        ]
        driver = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the kill reaches its Ray too
        )
        try:
            _wait_for(lambda: _markers(output) >= 1 or driver.poll() is not None, "a shard")
            assert driver.poll() is None, "the driver must still be running"
            os.killpg(driver.pid, signal.SIGKILL)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(60)
    assert driver.returncode == -signal.SIGKILL

    committed = _markers(output)
    assert 1 <= committed < N_IMAGES // 4
    assert len(outputs.read_scores(output)) == 0  # no run record: readers see nothing
    assert outputs.committed_runs(output) == []
    for uri in storage.list_files(f"{output}/scores"):  # what is there is whole, never partial
        fs, path = storage.pyarrow_fs(uri)
        assert pq.read_metadata(path, filesystem=fs).num_rows == 4

    summary = run_score_job(_config(world, output, decode_cpus=0.5))
    assert summary.skipped == 4 * committed
    assert summary.processed == N_IMAGES - summary.skipped
    assert summary.counts["rows"] == summary.counts["ok"] == N_IMAGES
    _assert_one_row_per_image(output, world.images)
    assert len(storage.list_files(f"{output}/scores")) == N_IMAGES // 4


def _send_raw(endpoint_url: str, request: bytes) -> None:
    """Send ``request`` bytes on a fresh connection and close it: a client that dies mid-PUT."""
    host, port = urlsplit(endpoint_url).hostname, urlsplit(endpoint_url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)


def test_proxy_never_forwards_a_truncated_put(s3_server: Any, s3_bucket: str) -> None:
    """A writer killed mid-body must not leave a short object behind the proxy: real S3 and
    moto store nothing for an incomplete request, so the proxy must not either (it once
    forwarded the bytes that had arrived, and the driver-kill test found a 0-byte shard)."""
    bucket = s3_bucket.removeprefix("s3://")
    with fault_proxy(s3_server.endpoint_url) as proxy:
        head = f"PUT /{bucket}/{{key}} HTTP/1.1\r\nHost: x\r\n"
        _send_raw(
            proxy.endpoint_url, (head.format(key="none") + "Content-Length: 100\r\n\r\n").encode()
        )
        _send_raw(
            proxy.endpoint_url,
            (head.format(key="short") + "Content-Length: 100\r\n\r\n").encode() + b"a" * 10,
        )
        _send_raw(
            proxy.endpoint_url,
            (head.format(key="chunked") + "Transfer-Encoding: chunked\r\n\r\n").encode()
            + b"a\r\n0123456789\r\n",  # one chunk, then the client is gone: no last chunk
        )
        storage.write_bytes_atomic(
            f"{s3_bucket}/whole", b"b" * 100, StorageOptions(proxy.endpoint_url)
        )
        assert proxy.stats.requests >= 1  # the whole PUT went through the proxy
    objects = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [(o["Key"], o["Size"]) for o in objects] == [("whole", 100)]


@pytest.mark.slow
def test_s3_transient_errors_retried_permanent_errors_become_rows(world: World) -> None:
    output = f"{world.bucket}/out-s3-faults"
    denied = world.images[3]
    missing = f"{world.archive}/{LINE}/missing.png"
    listing = f"{world.bucket}/listings/faults.csv"
    rows = [f"{uri},{LINE}" for uri in [*world.images, missing]]
    storage.write_text_atomic(listing, "image_uri,product_line\n" + "\n".join(rows) + "\n")
    budget = 12
    bucket_key = world.bucket.removeprefix("s3://")
    plan = FaultPlan(
        faults=("slowdown", "internal", "reset"),
        budget=budget,
        every=3,
        match=lambda method, key: key.startswith(bucket_key),
        denied_keys=frozenset({denied.removeprefix("s3://")}),
    )
    with fault_proxy(world.upstream, plan) as proxy:
        config = _config(
            world, output, input_uri=listing, storage=StorageOptions(proxy.endpoint_url)
        )
        summary = run_score_job(config)
        stats = proxy.stats

    assert stats.transient == budget
    assert dict(stats.injected) | {"denied": 0} == {
        "slowdown": budget // 3,
        "internal": budget // 3,
        "reset": budget // 3,
        "denied": 0,
    }
    assert stats.injected["denied"] >= 1
    counts = summary.counts
    assert (counts["rows"], counts["ok"], counts["errors"]) == (N_IMAGES + 1, N_IMAGES - 1, 2)
    assert counts["error_reasons"] == {"access_denied": 1, "not_found": 1}
    df = outputs.read_scores(output)
    errors = df[df["status"] == "error"].set_index("image_uri")
    assert errors.loc[denied, "error_reason"] == "access_denied"
    assert errors.loc[missing, "error_reason"] == "not_found"
    assert errors.loc[denied, "error"].startswith("access_denied: ")
    assert "ACCESS_DENIED" in errors.loc[denied, "error"]
    _assert_one_row_per_image(output, [*world.images, missing])


@pytest.mark.slow
def test_training_faults_fail_alone(ray_session: Any, s3_bucket: str, tmp_path: Path) -> None:
    """Three lines in one job: "fine" trains; "corrupt" (every image garbage) fails with the
    data message; "victim" (many epochs, so it is surely still training) has its Ray worker
    killed and fails with the crash named. Neither failure leaves a version in the registry."""
    spec = SyntheticSpec(
        product_lines=(LINE,), n_train=8, n_test_good=1, n_test_defect=1, size=SIZE
    )
    write_mvtec_dataset(tmp_path / "data", spec)
    good = tmp_path / "data" / LINE / "train" / "good"
    for path in sorted(good.glob("*.png")):
        storage.write_bytes_atomic(f"{s3_bucket}/data/good/{path.name}", path.read_bytes())
    for i in range(6):
        storage.write_bytes_atomic(f"{s3_bucket}/data/corrupt/{i}.png", b"\x89PNG garbage")
    manifest = f"{s3_bucket}/manifest.csv"
    storage.write_text_atomic(
        manifest,
        "product_line,train_uri,epochs\n"
        f"fine,{s3_bucket}/data/good,2\n"
        f"corrupt,{s3_bucket}/data/corrupt,2\n"
        f"victim,{s3_bucket}/data/good,100000\n",
    )
    models = f"{s3_bucket}/models"
    config = TrainJobConfig(
        manifest_uri=manifest,
        models_uri=models,
        image_size=SIZE,
        cpus_per_task=0.5,
        retry_delay_s=0.0,
        progress_interval_s=0.0,
        system_retries=0,  # a killed task is not re-run: its failure is the thing tested
    )
    killed: list[int] = []

    def kill_victim() -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            pid = _find_process("train-victim")
            if pid is not None and registry.latest_version(models, "fine") is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_victim, daemon=True)
    killer.start()
    result = run_train_job(config)
    killer.join(WAIT_S)

    assert len(killed) == 1
    by_line = {r.product_line: r for r in result.results}
    assert by_line["fine"].status == OK
    assert by_line["corrupt"].status == ERROR
    assert by_line["corrupt"].error.startswith(
        f"only 0 of 6 images in train_uri {s3_bucket}/data/corrupt could be decoded"
    )
    assert by_line["victim"].status == ERROR
    assert "Worker" in by_line["victim"].error and "died" in by_line["victim"].error
    assert registry.list_product_lines(models) == ["fine"]
    for line in ("corrupt", "victim"):
        assert registry.latest_version(models, line) is None
        assert registry.list_versions(models, line) == []
