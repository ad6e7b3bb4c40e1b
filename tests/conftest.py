"""Shared pytest fixtures for the whole suite.

Layout:
  1. Process environment, set at import time (before any test module imports boto3 or Ray),
     so nothing can reach real AWS and Ray starts quietly.
  2. S3 fixtures: ``s3_server`` (one moto server per session) and ``s3_bucket`` (fresh bucket
     per test).
  3. Ray fixture: ``ray_session`` (one local Ray instance per session).
  4. ``lease_race``: many runs racing for one date's run lease (local files and S3 alike).

Add new fixtures in the section they belong to, with a docstring saying what they guarantee.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# --------------------------------------------------------------------------------------------
# 1. Environment (import time)
# --------------------------------------------------------------------------------------------

# Make `import pipeline` work under plain `pytest` too (not only `python -m pytest`), since the
# package is not necessarily pip-installed in the venv.
_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

# Ray: no auth prompts, no usage-stats phone-home.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray starts its workers at niceness 15 (raylet's worker_niceness), so any ordinary process
# that keeps the cores busy gets ~28x their CPU share: under two busy loops a scoring actor
# spent minutes importing torch and fixtures hit the 600 s timeout. Tests must pass on a busy
# machine, so workers compete as equals; raylets started by ray.init, `ray start` and the CLI
# subprocesses all inherit this.
os.environ.setdefault("RAY_worker_niceness", "0")

# AWS: fake credentials, forced (not setdefault) so a developer's real keys, profile or config
# files can never be picked up; no EC2 metadata probing (slow, and a credential source).
FAKE_AWS_ACCESS_KEY_ID = "testing-key-id"
FAKE_AWS_SECRET_ACCESS_KEY = "testing-secret-never-logged"
os.environ["AWS_ACCESS_KEY_ID"] = FAKE_AWS_ACCESS_KEY_ID
os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_AWS_SECRET_ACCESS_KEY
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
for _var in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
    os.environ.pop(_var, None)
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
os.environ["AWS_CONFIG_FILE"] = os.devnull
# A pre-set endpoint would silently redirect the tests' S3 traffic; tests get theirs from
# s3_server via DFR_S3_ENDPOINT_URL only.
for _var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "DFR_S3_ENDPOINT_URL"):
    os.environ.pop(_var, None)

from pipeline.storage import StorageOptions  # noqa: E402  (needs sys.path set above)

# --------------------------------------------------------------------------------------------
# 2. S3 (moto server)
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    """Ask the OS for an unused TCP port on loopback (tiny race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    """Handle on the session's moto S3 server."""

    endpoint_url: str
    options: StorageOptions

    def client(self) -> Any:
        """A boto3 S3 client for arranging/inspecting test state directly (bypasses our code)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One in-process moto S3 server on 127.0.0.1 for the whole session.

    Exports ``DFR_S3_ENDPOINT_URL`` (read by ``StorageOptions.from_env``) so code under test,
    subprocesses and Ray workers started *after* this fixture reach the server without extra
    wiring. ``AWS_ENDPOINT_URL`` is deliberately not set: it would redirect every boto client,
    hiding code paths that forget to pass the endpoint. Restores the environment at teardown.
    """
    from moto.server import ThreadedMotoServer

    # One INFO line per request from moto's werkzeug server drowns real failure output.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint_url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DFR_S3_ENDPOINT_URL", endpoint_url)
        try:
            yield S3Server(endpoint_url=endpoint_url, options=StorageOptions(endpoint_url))
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, uniquely named, empty bucket; yields ``"s3://<bucket>"``.

    Best-effort emptied and deleted afterwards so a long session does not accumulate state.
    """
    client = s3_server.client()
    bucket = f"dfr-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=bucket)
    yield f"s3://{bucket}"
    try:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
    except Exception as exc:  # cleanup must not mask the test's own result
        logging.getLogger(__name__).warning("could not delete test bucket %s: %s", bucket, exc)


# --------------------------------------------------------------------------------------------
# 3. Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ray_session(s3_server: S3Server) -> Iterator[Any]:
    """A local 2-CPU Ray instance shared by the session; yields the ``ray.init`` context.

    Depends on ``s3_server`` on purpose: Ray workers inherit the environment of the moment
    ``ray.init`` runs, so the S3 endpoint and fake credentials must be exported first. Changing
    ``os.environ`` later does not reach already-started workers.
    """
    import ray

    ctx = ray.init(
        num_cpus=2,
        include_dashboard=False,
        ignore_reinit_error=True,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    try:
        yield ctx
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------
# 4. Run-lease race


def _lease_race(output: str, date: str, runs: int, timeout_s: float) -> tuple[list, list[str]]:
    """``runs`` threads acquire ``output``'s lease for ``date`` at once (a barrier releases
    them together); returns (the leases that were won, the LeaseHeld messages of the rest)."""
    import threading

    from pipeline.run_lease import LeaseHeld, RunLease

    barrier = threading.Barrier(runs)
    winners: list[RunLease] = []
    refused: list[str] = []

    def contend(i: int) -> None:
        lease = RunLease(output, date, f"run-{i}")
        barrier.wait()
        try:
            lease.acquire()
            winners.append(lease)
        except LeaseHeld as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(runs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return winners, refused


@pytest.fixture
def lease_race() -> Any:
    """``lease_race(output, date, runs, timeout_s)`` -> (won leases, LeaseHeld messages)."""
    return _lease_race
