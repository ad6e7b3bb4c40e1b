"""One scoring run at a time per (output, run date): a lease taken by conditional create.

Two ``dfr-pipeline score`` processes for the same output and date (a cron retry while a slow run
is still going, two operators) would otherwise race: each deletes the other's "superseded" files
and sweeps the other's temp files. The lease makes the second one stop at once with a clear
message (:class:`LeaseHeld`), before it writes anything.

Protocol (same on local files and S3, no locks, no deletes needed for correctness):

* Leases are objects ``{output}/_leases/run_date=D/{generation:08d}.json``; the highest
  generation is the current one. To acquire, a run lists them: if the current lease is live it
  loses; otherwise (none, released, or stale) it creates generation ``current + 1`` with a
  conditional create (:func:`pipeline.storage.create_exclusive`: ``link`` locally,
  ``If-None-Match: *`` on S3). Of two runs racing for the same generation exactly one succeeds.
* A lease is live until ``expires_at``; the holder renews it every ``ttl_s / 4`` from a thread.
  A holder on this host whose process is gone (killed driver) is stale at once, so a rerun
  right after a kill does not wait for the expiry; a holder on another host is stale after
  ``ttl_s`` without renewal.
* Fencing: before it commits, the holder checks that its generation is still the current one
  (:meth:`RunLease.check`), so a holder that stalled past its expiry and was taken over never
  commits over the new holder.
* Releasing deletes the holder's lease object, so a finished run leaves nothing under
  ``_leases/``; a new lease then starts again at generation 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass

from pipeline import storage
from pipeline.storage import StorageOptions

#: Seconds a lease stays live without renewal (a holder on another host that died).
DEFAULT_TTL_S = 120.0
#: Age after which a temp file beside the leases is debris of a killed writer.
TEMP_GRACE_S = 60.0


class LeaseHeld(RuntimeError):
    """Another run of the same output and date holds the lease: this one must not run."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stalled past its expiry): it must not commit."""


@dataclass(frozen=True)
class Holder:
    """What a lease object says about the run that holds it."""

    owner: str  # random token of the holding run
    run_id: str
    host: str
    pid: int
    pid_started: str | None  # the process's start time (Linux), so a reused pid is not alive
    acquired_at: str
    expires_at: float  # epoch seconds on the holder's clock

    def describe(self) -> str:
        left = self.expires_at - time.time()
        return (
            f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.acquired_at}, "
            f"lease renewed until {left:.0f} s from now)"
        )


def _pid_started(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, started: str | None) -> bool:
    """True unless ``pid`` is gone (or is another process than the one started at ``started``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or _pid_started(pid) in (None, started)


def is_stale(holder: Holder, now: float | None = None) -> bool:
    """True when ``holder`` can no longer be running: expired, or a dead process on this host."""
    if (now or time.time()) > holder.expires_at:
        return True
    if holder.host == socket.gethostname():
        return not process_alive(holder.pid, holder.pid_started)
    return False


class RunLease:
    """The lease of one run on ``(output, run_date)``; use as a context manager."""

    def __init__(
        self,
        output: str,
        run_date: str,
        run_id: str,
        options: StorageOptions | None = None,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.root = f"{output.rstrip('/')}/_leases/run_date={run_date}"
        self.leases_dir = f"{output.rstrip('/')}/_leases"
        self.run_id = run_id
        self.options = options
        self.ttl_s = ttl_s
        self.owner = secrets.token_hex(8)
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- objects ---------------------------------------------------------------------------

    def _uri(self, generation: int) -> str:
        return storage.join_uri(self.root, f"{generation:08d}.json")

    def _generations(self) -> list[int]:
        try:
            uris = storage.list_files(self.root, (".json",), self.options)
        except FileNotFoundError:
            return []
        names = (posixpath.basename(uri) for uri in uris)
        return sorted(int(n[:-5]) for n in names if n[:-5].isdigit() and not n.startswith("."))

    def _read(self, generation: int) -> Holder | None:
        try:
            data = json.loads(storage.read_text(self._uri(generation), self.options))
            return Holder(**data)
        except FileNotFoundError:
            return None  # released meanwhile
        except (ValueError, TypeError):
            # Unreadable lease: treat it as expired rather than blocking the date forever.
            return Holder("?", "?", "?", -1, None, "?", 0.0)

    def _holder(self) -> Holder:
        return Holder(
            owner=self.owner,
            run_id=self.run_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=_pid_started(os.getpid()),
            acquired_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            expires_at=time.time() + self.ttl_s,
        )

    # ---- protocol --------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming the run that holds it."""
        generations = self._generations()
        current = generations[-1] if generations else -1
        if current >= 0:
            holder = self._read(current)
            if holder is not None and not is_stale(holder):
                raise LeaseHeld(f"another run holds the lease: {holder.describe()}")
        mine = current + 1
        data = json.dumps(asdict(self._holder()), sort_keys=True).encode()
        if not storage.create_exclusive(self._uri(mine), data, self.options):
            winner = self._read(mine)
            who = winner.describe() if winner is not None else "a run that already finished"
            raise LeaseHeld(f"another run took the lease first: {who}")
        self.generation = mine
        for old in generations:  # stale leases of killed runs: ours supersedes them
            storage.remove_tree(self._uri(old), self.options)
        self._sweep_temp_files()
        self._thread = threading.Thread(target=self._renew_loop, name="run-lease", daemon=True)
        self._thread.start()

    def _sweep_temp_files(self) -> None:
        """Temp files of lease writes killed mid-write (local only; S3 writes have none).

        Contenders create their temp files here for a few microseconds (write, then link), so
        only temp files older than TEMP_GRACE_S are debris.
        """
        protocol_local = "://" not in self.root or self.root.startswith("file://")
        if not protocol_local:
            return
        directory = storage.get_fs(self.root, self.options)[1]
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(directory, name)
            try:
                if name.startswith(".") and time.time() - os.path.getmtime(path) > TEMP_GRACE_S:
                    os.unlink(path)
            except FileNotFoundError:
                continue

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._renew()
            except Exception as exc:  # a failed renewal is retried; check() reports loss
                if self.lost is None and isinstance(exc, LeaseLost):
                    self.lost = str(exc)

    def _renew(self) -> None:
        assert self.generation is not None
        self._check_current()
        holder = self._holder()
        text = json.dumps(asdict(holder), sort_keys=True)
        storage.write_text_atomic(self._uri(self.generation), text, self.options)

    def _check_current(self) -> None:
        generations = self._generations()
        if self.generation is None or not generations or generations[-1] != self.generation:
            raise LeaseLost(
                f"the lease of run {self.run_id} was taken over by a later run "
                f"(generations now {generations[-3:]}); this run does not commit"
            )

    def check(self) -> None:
        """Fencing before a commit: raise :class:`LeaseLost` unless we still hold the lease."""
        if self.lost is not None:
            raise LeaseLost(self.lost)
        self._check_current()

    def release(self) -> None:
        """Stop renewing and delete our lease object (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self.generation is not None:
            holder = self._read(self.generation)
            if holder is not None and holder.owner == self.owner:
                storage.remove_tree(self._uri(self.generation), self.options)
            self.generation = None
            storage.remove_empty_dir(self.root)
            storage.remove_empty_dir(self.leases_dir)

    def __enter__(self) -> RunLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
