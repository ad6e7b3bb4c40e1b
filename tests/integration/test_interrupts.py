"""Interrupted and overlapping scoring runs leave only committed objects (local Ray).

* Kills at many points: a ``dfr-pipeline score`` driver SIGKILLed after each of many delays
  (during start-up, listing, actor start, scoring, mask writes, commit, after commit), then
  rerun: the output tree holds exactly the committed run's score files, its shard markers, the
  masks/heatmaps its rows name and its run record (no temp file, no staging, no lease), with
  one row per image.
* Interrupt/resume repeated while two busy processes keep both cores loaded: N of N.
* Two ``dfr-pipeline score`` processes started together on the same output and date, on local
  files and on the S3 server: one commits, the other exits 5 naming the holder (or finds the
  run committed); exactly one row per image and one run record.

The drivers connect to the session's Ray (``--address``) so a kill loop does not start a Ray
instance per iteration. Nothing asserts on timings: the delays only spread the kill points.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from test_faults import publish_tiny_model, upload_images

from pipeline import outputs
from pipeline.score_job import RunInterrupted, ScoreJobConfig, run_score_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

LINE = "metal_plate"
N_IMAGES = 32  # 8 shards of 4
DATE = "2024-07-01"
#: Where the driver is SIGKILLed: start-up and listing (seconds after start), mid-scoring with
#: masks and heatmaps being written (after N of 8 shards committed), and between the run
#: record and the clean-up after it.
KILL_POINTS = (
    ("seconds", 0.3),
    ("seconds", 4.0),
    ("markers", 1),
    ("markers", 4),
    ("markers", 7),
    ("record", 1),
)
WAIT_S = 600.0
REPEATS_UNDER_LOAD = 3
EXIT_LEASE_HELD = 5


@dataclass(frozen=True)
class World:
    models_uri: str
    archive: str
    images: list[str]
    cache_dir: Path
    ray_address: str


@pytest.fixture(scope="module")
def world(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("interrupts")
    models = str(tmp / "models")
    publish_tiny_model(models, LINE, tmp / "trained")
    images = upload_images(str(tmp / "archive"), LINE, N_IMAGES)
    address = ray_session.address_info["address"]
    return World(models, str(tmp / "archive"), images, tmp / "cache", address)


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
        masks="all",
        heatmaps=True,
        cache_dir=str(world.cache_dir),
        quiet=True,
    )
    return replace(base, **changes)


def _command(world: World, output: str) -> list[str]:
    return [
        str(Path(sys.executable).with_name("dfr-pipeline")),
        "score",
        *("--models-uri", world.models_uri, "--input", world.archive, "--output", output),
        *("--run-date", DATE, "--shard-size", "4", "--batch-size", "4", "--quiet"),
        *("--cpus-per-actor", "0.5", "--decode-cpus", "0.25", "--masks", "all", "--heatmaps"),
        *("--cache-dir", str(world.cache_dir), "--address", world.ray_address),
    ]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def assert_only_committed(output: str, images: list[str]) -> None:
    """The output tree is exactly what the committed run names, one row per image."""
    root = Path(output)
    runs = outputs.committed_runs(output)
    assert len(runs) == 1, [r["run_id"] for r in runs]
    record = runs[0]
    df = outputs.read_scores(output)
    assert sorted(df["image_uri"]) == sorted(images)  # 0 lost, 0 duplicated
    assert df["image_id"].is_unique
    assert len(outputs.read_scores(output, committed_only=False)) == len(images)
    named = {f"runs/{record['run_id']}.json"}
    named |= {rel for files in record["files"].values() for rel in files}
    for column in ("mask_uri", "heatmap_uri"):
        named |= {outputs.relative_to(output, uri) for uri in df[column].dropna()}
    # the run's drift rows (pipeline.drift_io), named by the record like its score files
    named |= {line["file"] for line in (record.get("drift") or {}).get("lines", {}).values()}
    markers_root = f"_shards/run_date={DATE}/{record['run_key']}/{LINE}/"
    markers = {f for f in _files(root) if f.startswith(markers_root) and f.endswith(".json")}
    assert len(markers) == sum(len(files) for files in record["files"].values())
    assert _files(root) == named | markers  # no temp file, no other run's files
    assert not (root / "_staging").exists() and not (root / "_leases").exists()


def _kill_when(point: tuple[str, float], output: str, driver: subprocess.Popen) -> None:
    """Wait for the kill point: seconds after start, N committed shard markers, or the run
    record (killed between the commit and its clean-up); returns early if the driver exits."""
    kind, value = point
    deadline = time.monotonic() + (value if kind == "seconds" else WAIT_S)
    root = Path(output)
    while driver.poll() is None and time.monotonic() < deadline:
        if kind == "markers" and len(list(root.glob("_shards/*/*/*/*.json"))) >= value:
            return
        if kind == "record" and list(root.glob("runs/*.json")):
            return
        time.sleep(0.02)
    if kind != "seconds" and driver.poll() is None:
        raise AssertionError(f"gave up waiting for kill point {point}")


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_driver_killed_at_many_points_then_rerun_leaves_only_committed(world, tmp_path):
    outcomes = []
    for point in KILL_POINTS:
        output = str(tmp_path / f"out-{point[0]}-{point[1]}")
        driver = subprocess.Popen(
            _command(world, output),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            _kill_when(point, output, driver)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(60)
        committed_before = len(outputs.committed_runs(output))
        summary = run_score_job(_config(world, output))
        assert summary.counts["rows"] == summary.counts["ok"] == N_IMAGES
        assert_only_committed(output, world.images)
        outcomes.append((point, driver.returncode, committed_before, summary.skipped))
    print("kill point, driver rc, runs committed at kill, rows skipped by rerun:", outcomes)
    killed = [o for o in outcomes if o[1] == -signal.SIGKILL]
    assert any(o[2] == 0 for o in killed)  # at least one kill before the commit (0.3 s)
    assert any(o[0][0] == "markers" and o[1] == -signal.SIGKILL for o in outcomes)


def _interrupt_then_resume(world: World, output: str) -> None:
    config = _config(world, output)
    with pytest.raises(RunInterrupted):
        run_score_job(replace(config, stop_after_shards=2))
    assert len(outputs.read_scores(output)) == 0  # nothing visible before the run record
    summary = run_score_job(config)
    assert summary.skipped == 8 and summary.processed == N_IMAGES - 8
    assert_only_committed(output, world.images)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_interrupt_resume_repeated_under_cpu_load(world, tmp_path):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    passed, failures = 0, []
    try:
        for i in range(REPEATS_UNDER_LOAD):
            try:
                _interrupt_then_resume(world, str(tmp_path / f"rep-{i}"))
                passed += 1
            except AssertionError as exc:
                failures.append(f"repeat {i}: {exc}")
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    print(f"interrupt/resume under CPU load: {passed} of {REPEATS_UNDER_LOAD} passed")
    assert passed == REPEATS_UNDER_LOAD, failures


def _overlapping(world: World, output: str, env: dict[str, str]) -> list[tuple[int, str]]:
    procs = [
        subprocess.Popen(
            _command(world, output),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append((proc.returncode, out))
    return results


def _check_overlap(results: list[tuple[int, str]]) -> None:
    codes = sorted(rc for rc, _ in results)
    texts = "\n---\n".join(out for _, out in results)
    noises = (
        "core_worker.cc",
        "constructor arguments",
        "Progress bars disabled",
        "Token",
        "Deprec",
    )
    for noise in noises:
        assert noise not in texts  # a successful run prints nothing the user cannot act on
    assert codes in ([0, EXIT_LEASE_HELD], [0, 0]), texts
    if codes == [0, EXIT_LEASE_HELD]:
        loser = next(out for rc, out in results if rc == EXIT_LEASE_HELD)
        assert "another run" in loser and ("holds the lease" in loser or "took the lease" in loser)
        assert f"run date {DATE}" in loser
    else:  # the second started after the first had committed
        assert "already committed" in texts


def test_overlapping_runs_local_one_commits(world, tmp_path):
    output = str(tmp_path / "out")
    _check_overlap(_overlapping(world, output, dict(os.environ)))
    assert_only_committed(output, world.images)


def test_overlapping_runs_s3_one_commits(world, s3_bucket, tmp_path):
    output = f"{s3_bucket}/out"
    _check_overlap(_overlapping(world, output, dict(os.environ)))
    runs = outputs.committed_runs(output)
    assert len(runs) == 1
    df = outputs.read_scores(output)
    assert sorted(df["image_uri"]) == sorted(world.images) and df["image_id"].is_unique
    assert len(outputs.read_scores(output, committed_only=False)) == N_IMAGES
