"""Multi-node proof on one machine: the real CLI against a Ray cluster of separate processes.

A head (no CPUs) and two worker nodes, each declaring one logical GPU and ``dfr_worker``, run
as ``ray start`` processes on 127.0.0.1 (see ``cluster.py``). ``dfr-pipeline train`` and
``dfr-pipeline score`` run in subprocesses with ``--address`` (the test process may hold the
suite's own Ray), reading and writing the local S3 server.

Contracts checked:
- training with ``--gpus-per-task 0.5`` trains every line on a worker node, both workers train
  some, and the recorded device is CPU (logical GPUs, no physical one: the fallback works);
- scoring writes exactly one ok row per image, each with the ``node_id`` of a worker node,
  and both workers score some;
- a worker node killed mid-scoring: the job completes, or fails with an ``error:`` message and
  a rerun completes; either way exactly one row per image is committed;
- the cluster leaves no process behind (checked by ``local_cluster`` at teardown).
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cluster import LocalCluster, local_cluster  # tests/integration (rootdir import mode)
from PIL import Image

from pipeline import outputs, registry, storage
from pipeline.synthetic import SyntheticSpec, render_normal, write_mvtec_dataset

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

LINES = ("metal_plate", "woven_fabric", "wood_panel", "ceramic_tile")
SCORE_PER_LINE = 60  # 240 images scored
SIZE = 64
CLI_TIMEOUT_S = 420
TRAIN_FLAGS = [
    "--image-size", str(SIZE), "--epochs", "3", "--gpus-per-task", "0.5",
    "--cpus-per-task", "0.25", "--retries", "0",
]  # fmt: skip
#: One scoring actor per worker node: each wants the node's only (logical) GPU.
SCORE_FLAGS = [
    "--actors", "2", "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--decode-cpus",
    "0.25", "--batch-size", "16", "--quiet",
]  # fmt: skip


def _exe() -> str:
    return shutil.which("dfr-pipeline") or str(Path(sys.executable).parent / "dfr-pipeline")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _upload(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(
                storage.join_uri(uri, *path.relative_to(local).parts), path.read_bytes()
            )


@dataclass(frozen=True)
class World:
    cluster: LocalCluster
    bucket: str
    models_uri: str
    score_input: str  # prefix <input>/<line>/<file>.png
    image_uris: frozenset[str]
    cache_dir: Path
    train: subprocess.CompletedProcess


#: Ray Data hands blocks to whichever actor is ready: under load one actor can score every
#: block before the other has loaded its model. Waiting for the pool's minimum (both actors)
#: before the first block makes "both workers score some" a contract rather than a race.
WAIT_FOR_BOTH_ACTORS = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": str(CLI_TIMEOUT_S)}


def _run(
    cluster: LocalCluster, args: list[str], extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_exe(), *args, "--address", cluster.address],
        env={**cluster.env, **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )


def _score_args(world: World, output: str, run_date: str) -> list[str]:
    return [
        "score", "--models-uri", world.models_uri, "--input", world.score_input, "--output",
        output, "--run-date", run_date, "--cache-dir", str(world.cache_dir), *SCORE_FLAGS,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Data on S3, the cluster, and the four lines trained on it (once for the module).

    Deliberately not using ``ray_session``: the cluster is separate processes with its own
    ports and temp dir; ``s3_server`` exports DFR_S3_ENDPOINT_URL before the nodes start, so
    their workers reach it.
    """
    tmp = tmp_path_factory.mktemp("cluster")
    client = s3_server.client()
    client.create_bucket(Bucket="dfr-cluster-test")
    bucket = "s3://dfr-cluster-test"
    spec = SyntheticSpec(
        product_lines=LINES, n_train=12, n_test_good=2, n_test_defect=2, size=SIZE, seed=3
    )
    write_mvtec_dataset(tmp / "archive", spec)
    manifest = tmp / "manifest.csv"
    rows = ["product_line,train_uri,test_uri"]
    for line in LINES:
        _upload(tmp / "archive" / line, f"{bucket}/archive/{line}")
        rows.append(f"{line},{bucket}/archive/{line}/train/good,{bucket}/archive/{line}")
    manifest.write_text("\n".join(rows) + "\n")
    image_uris = set()
    for line in LINES:
        for i in range(SCORE_PER_LINE):
            uri = f"{bucket}/score-input/{line}/{i:04d}.png"
            rng = np.random.default_rng(10_000 + i)
            storage.write_bytes_atomic(uri, _png(render_normal(line, rng, SIZE + 16 * (i % 3))))
            image_uris.add(uri)

    with local_cluster(tmp, workers=2, gpus_per_worker=1, resources={"dfr_worker": 1}) as cluster:
        models_uri = f"{bucket}/models"
        train = _run(
            cluster,
            ["train", "--products", str(manifest), "--models-uri", models_uri, *TRAIN_FLAGS,
             "--s3-endpoint-url", s3_server.endpoint_url],
        )  # fmt: skip
        yield World(
            cluster=cluster,
            bucket=bucket,
            models_uri=models_uri,
            score_input=f"{bucket}/score-input",
            image_uris=frozenset(image_uris),
            cache_dir=tmp / "cache",
            train=train,
        )


def test_train_and_score_spread_over_both_workers(world: World, s3_server) -> None:
    workers = world.cluster.worker_node_ids()
    assert len(workers) == 2, workers
    worker_ids = set(workers.values())

    assert world.train.returncode == 0, world.train.stdout + world.train.stderr
    trained_on = {}
    for line in LINES:
        version = registry.latest_version(world.models_uri, line, s3_server.options)
        assert version is not None, line
        meta = registry.read_version_metadata(world.models_uri, line, version, s3_server.options)
        extra = meta["extra"]
        # Ray assigned a logical GPU, there is no physical one: training fell back to CPU.
        assert extra["device"] == "cpu", (line, extra)
        trained_on[line] = extra["node_id"]
    assert set(trained_on.values()) == worker_ids, trained_on  # both workers, never the head

    output = f"{world.bucket}/scores-spread"
    result = _run(world.cluster, _score_args(world, output, "2024-05-01"), WAIT_FOR_BOTH_ACTORS)
    assert result.returncode == 0, result.stdout + result.stderr

    df = outputs.read_scores(output, "2024-05-01", options=s3_server.options)
    assert len(df) == len(world.image_uris)
    assert set(df["image_uri"]) == world.image_uris
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", "error"].tolist()
    assert set(df["node_id"]) == worker_ids, df["node_id"].value_counts().to_dict()


def test_worker_killed_mid_scoring_then_one_row_per_image(world: World, s3_server) -> None:
    """Kill a worker node while its actor scores; a replacement node joins (as an autoscaler
    would provide). The job completes, or fails clearly and a rerun completes; the committed
    result has exactly one ok row per image."""
    assert world.train.returncode == 0, world.train.stderr
    output = f"{world.bucket}/scores-kill"
    date = "2024-05-02"
    args = _score_args(world, output, date) + ["--masks", "all", "--shard-size", "20"]
    args[args.index("--batch-size") + 1] = "8"
    proc = subprocess.Popen(
        [_exe(), *args, "--address", world.cluster.address],
        env=world.cluster.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client, bucket = s3_server.client(), world.bucket.removeprefix("s3://")
        deadline = time.monotonic() + CLI_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            listed = client.list_objects_v2(Bucket=bucket, Prefix="scores-kill/_shards/")
            if listed.get("KeyCount", 0):
                break  # scoring is under way: at least one shard committed
            time.sleep(0.5)
        assert proc.poll() is None, "the job ended before a worker could be killed"
        world.cluster.kill_worker(0)
        world.cluster.add_worker()
        stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    print(f"first run: exit {proc.returncode}\n{stderr[-2000:]}")  # shown by pytest -rP
    if proc.returncode != 0:
        assert "error" in stderr.lower(), stderr[-3000:]  # a message, not a silent failure
        rerun = _run(world.cluster, args)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr

    df = outputs.read_scores(output, date, options=s3_server.options)
    assert len(df) == len(world.image_uris)
    assert df["image_id"].is_unique
    assert set(df["image_uri"]) == world.image_uris
    assert (df["status"] == "ok").all(), df.loc[df["status"] != "ok", "error"].tolist()
