"""The run lease on the local S3 server (moto): conditional create is what makes it exclusive.

moto honours ``If-None-Match: *`` on PutObject (412 PreconditionFailed when the key exists), as
AWS S3 does since 2024; s3fs sends it for ``pipe_file(mode="create")``. No Ray needed.
"""

from __future__ import annotations

import time

import pytest

from pipeline import storage
from pipeline.run_lease import LeaseLost, RunLease

pytestmark = pytest.mark.integration

DATE = "2024-05-01"


def test_create_exclusive_on_s3(s3_bucket):
    uri = f"{s3_bucket}/leases/key.json"
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_racing_runs_on_s3_exactly_one_wins(s3_bucket, lease_race):
    output = f"{s3_bucket}/out"
    winners, refused = lease_race(output, DATE, 6, 60)
    assert len(winners) == 1 and len(refused) == 5
    winners[0].check()
    winners[0].release()
    assert storage.list_files(s3_bucket) == []  # released: nothing left under _leases/


def test_taken_over_run_cannot_commit_on_s3(s3_bucket):
    output = f"{s3_bucket}/out"
    first = RunLease(output, DATE, "stalled", ttl_s=0.2)
    first.acquire()
    first._stop.set()  # simulate a stalled holder: no more renewals
    first._thread.join()
    time.sleep(0.3)
    second = RunLease(output, DATE, "successor")
    second.acquire()
    assert second.generation == 1
    with pytest.raises(LeaseLost):
        first.check()
    first.release()
    second.check()
    second.release()
    assert storage.list_files(s3_bucket) == []
