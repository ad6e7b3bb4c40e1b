"""The run lease and the writers it relies on, on local files (no Ray, no network).

Contracts: a conditional create succeeds exactly once; atomic writes with a staging directory
leave temp files only there, even when the write fails; of many runs racing for one date's
lease exactly one wins, the others get LeaseHeld naming the holder; a lease of a dead process or
past its expiry is taken over; a run whose lease was taken over cannot pass check(); a
released lease leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import outputs, storage
from pipeline.run_lease import Holder, LeaseHeld, LeaseLost, RunLease, is_stale

DATE = "2024-05-01"


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_create_exclusive_once_and_no_temp_left(tmp_path):
    uri = str(tmp_path / "a" / "key.json")
    assert storage.create_exclusive(uri, b"first")
    assert not storage.create_exclusive(uri, b"second")
    assert Path(uri).read_bytes() == b"first"
    assert _files(tmp_path) == ["a/key.json"]


def test_atomic_write_temp_goes_to_staging_even_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "masks" / "x.png"
    staging = tmp_path / "out" / "_staging" / "run_date=2024-05-01"
    storage.write_bytes_atomic(str(target), b"ok", staging=str(staging))
    assert target.read_bytes() == b"ok"
    assert list(staging.iterdir()) == []  # the temp was renamed away

    seen: list[str] = []

    def failing_replace(src: str, dst: str) -> None:
        seen.append(src)
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_bytes_atomic(str(target), b"new", staging=str(staging))
    assert seen and Path(seen[0]).parent == staging  # the temp was in staging, not in masks/
    assert target.read_bytes() == b"ok"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.png"]


def test_clear_staging_removes_debris_and_the_empty_parent(tmp_path):
    output = str(tmp_path / "out")
    staging = Path(outputs.staging_uri(output, DATE))
    staging.mkdir(parents=True)
    (staging / ".x.png.abc.tmp").write_bytes(b"half")
    outputs.clear_staging(output, DATE)
    assert not (tmp_path / "out" / "_staging").exists()


def test_acquire_release_leaves_nothing(tmp_path):
    output = str(tmp_path / "out")
    with RunLease(output, DATE, "run-a") as lease:
        assert lease.generation == 0
        assert _files(tmp_path / "out") == ["_leases/run_date=2024-05-01/00000000.json"]
        lease.check()
    assert not (tmp_path / "out").exists() or _files(tmp_path / "out") == []
    assert not (tmp_path / "out" / "_leases").exists()


def test_second_run_is_refused_with_the_holder_named(tmp_path):
    output = str(tmp_path / "out")
    with RunLease(output, DATE, "run-a"):
        with pytest.raises(LeaseHeld, match="run run-a .*pid"):
            RunLease(output, DATE, "run-b").acquire()
    RunLease(output, "2024-05-02", "run-c").acquire()  # other dates are independent


def test_many_racing_runs_exactly_one_wins(tmp_path, lease_race):
    output = str(tmp_path / "out")
    winners, refused = lease_race(output, DATE, 8, 30)
    assert len(winners) == 1 and len(refused) == 7
    winners[0].release()


def _plant(output: str, generation: int, holder: Holder) -> Path:
    path = Path(output) / "_leases" / f"run_date={DATE}" / f"{generation:08d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder.__dict__))
    return path


def test_lease_of_a_killed_process_is_taken_over_at_once(tmp_path):
    output = str(tmp_path / "out")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    far = time.time() + 3600
    old = _plant(output, 3, Holder("x", "killed", socket.gethostname(), dead.pid, None, "t", far))
    debris = old.parent / ".00000003.json.abc.tmp"
    debris.write_text("half a renewal, killed two minutes ago")
    os.utime(debris, (time.time() - 120, time.time() - 120))
    with RunLease(output, DATE, "rerun") as lease:
        assert lease.generation == 4
        assert _files(Path(output)) == ["_leases/run_date=2024-05-01/00000004.json"]


def test_expired_lease_of_another_host_is_taken_over(tmp_path):
    output = str(tmp_path / "out")
    past = time.time() - 1
    _plant(output, 0, Holder("x", "gone", "other-host", 1, None, "t", past))
    assert is_stale(Holder("x", "gone", "other-host", 1, None, "t", past))
    assert not is_stale(Holder("x", "live", "other-host", 1, None, "t", time.time() + 60))
    with RunLease(output, DATE, "next") as lease:
        assert lease.generation == 1


def test_live_lease_of_another_host_blocks(tmp_path):
    output = str(tmp_path / "out")
    _plant(output, 0, Holder("x", "busy", "other-host", 1, None, "t", time.time() + 60))
    with pytest.raises(LeaseHeld, match="run busy"):
        RunLease(output, DATE, "me").acquire()


def test_taken_over_run_cannot_commit(tmp_path):
    output = str(tmp_path / "out")
    first = RunLease(output, DATE, "stalled", ttl_s=60)
    first.acquire()
    # The first run stalls past its expiry: simulate by rewriting its lease as expired.
    path = Path(output) / "_leases" / f"run_date={DATE}" / "00000000.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "expires_at": time.time() - 1}))
    second = RunLease(output, DATE, "successor")
    second.acquire()
    with pytest.raises(LeaseLost, match="taken over"):
        first.check()
    second.check()
    first.release()  # must not delete the successor's lease
    second.check()
    second.release()


def test_renewal_extends_the_expiry(tmp_path):
    output = str(tmp_path / "out")
    with RunLease(output, DATE, "renewing", ttl_s=0.4) as lease:
        path = Path(output) / "_leases" / f"run_date={DATE}" / "00000000.json"
        first = json.loads(path.read_text())["expires_at"]
        deadline = time.time() + 20
        while json.loads(path.read_text())["expires_at"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert json.loads(path.read_text())["expires_at"] > first
        lease.check()
