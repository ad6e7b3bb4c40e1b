"""A real multi-node Ray cluster on 127.0.0.1, made of separate ``ray start`` processes.

Why not ``ray.cluster_utils.Cluster``: it runs every node inside the test process, so it proves
nothing about code shipped to other processes, environments and object stores. Here a head and
N worker nodes are each a ``ray start --block`` in its own process group, so a test can kill one
node (its raylet and workers) like a lost machine, and teardown can end exactly our processes.

Why not ``ray stop``: it kills every raylet on the machine, including the suite's own
``ray_session`` instance and other developers' clusters. Teardown instead kills our process
groups, then any leftover process whose command line names our private ``--temp-dir``, and
checks by pid that none survived.

The head declares no CPUs, so every task and actor must run on a worker node; workers declare
logical GPUs and a custom resource so scheduling by GPU can be tested on a machine without one
(code on them must fall back to CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.ray_runtime import START_ATTEMPTS, STARTUP_TIMED_OUT

#: Per-node object store: small, so three nodes plus the suite's own Ray fit in /dev/shm.
OBJECT_STORE_BYTES = 256 * 2**20
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
_RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    """An unused loopback TCP port (tiny race; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_range(width: int = 40) -> tuple[int, int]:
    """A run of ``width`` free ports for one node's workers, so nodes never share a range."""
    for _ in range(200):
        start = free_port()
        if start + width > 65000:
            continue
        ports = range(start, start + width)
        if all(_port_free(p) for p in ports):
            return start, start + width - 1
    raise RuntimeError("no free port range for Ray workers")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _node_ports() -> list[str]:
    """Distinct ports for everything a node listens on (defaults would collide on one host).

    The workers' range is free when chosen, so the OS may hand out one of its ports as the
    next ephemeral one: single ports are drawn outside the range and never twice (Ray refuses
    to start a node whose components share a port).
    """
    low, high = _free_range()
    taken: set[int] = set()

    def single() -> int:
        while True:
            port = free_port()
            if not low <= port <= high and port not in taken:
                taken.add(port)
                return port

    return [
        f"--node-manager-port={single()}",
        f"--object-manager-port={single()}",
        f"--min-worker-port={low}",
        f"--max-worker-port={high}",
        f"--dashboard-agent-listen-port={single()}",
        f"--dashboard-agent-grpc-port={single()}",
        f"--runtime-env-agent-port={single()}",
        f"--metrics-export-port={single()}",
    ]


@dataclass
class Node:
    """One ``ray start --block`` process group."""

    name: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class LocalCluster:
    """Handle on a running cluster: its address, environment, nodes and helpers."""

    address: str  # "127.0.0.1:PORT", for --address
    temp_dir: Path  # private --temp-dir; every process of ours names it on its command line
    env: dict[str, str]  # what the nodes run with; use it for drivers too
    head: Node
    workers: list[Node] = field(default_factory=list)
    _worker_args: list[str] = field(default_factory=list)

    # ---- inspection ------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """``ray.nodes()`` of this cluster, from a short-lived driver in a subprocess.

        A subprocess, because the test process may already hold the suite's own Ray
        (``ray_session``) and one process can be connected to one cluster only.
        """
        code = (
            "import json, logging, ray\n"
            f"ray.init(address={self.address!r}, logging_level=logging.ERROR,"
            " include_dashboard=False)\n"
            "print('NODES=' + json.dumps([{k: n[k] for k in "
            "('NodeID', 'NodeName', 'Alive', 'Resources', 'NodeManagerPort')} "
            "for n in ray.nodes()]))\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        line = next(x for x in out.splitlines() if x.startswith("NODES="))
        return json.loads(line[len("NODES=") :])

    def worker_node_ids(self) -> dict[str, str]:
        """{worker name: Ray node id} of the alive worker nodes (the head excluded)."""
        names = {w.name for w in self.workers}
        return {
            n["NodeName"]: n["NodeID"]
            for n in self.nodes()
            if n["Alive"] and n["NodeName"] in names
        }

    def wait_for_nodes(self, count: int, timeout: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Block until exactly ``count`` nodes are alive (a node is up once registered)."""
        deadline = time.monotonic() + timeout
        alive: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            alive = [n for n in self.nodes() if n["Alive"]]
            if len(alive) == count:
                return alive
            time.sleep(1.0)
        raise RuntimeError(f"expected {count} alive nodes, have {len(alive)}: {alive}")

    # ---- changes ---------------------------------------------------------------------------

    def add_worker(self) -> Node:
        """Start one more worker node (e.g. to replace a killed one); waits until it is up."""
        name = f"dfr-worker-{len(self.workers)}"
        args = [
            "start",
            f"--address={self.address}",
            "--node-ip-address=127.0.0.1",
            f"--node-name={name}",
            f"--temp-dir={self.temp_dir}",
            *self._worker_args,
            *_node_ports(),
        ]
        node = _start(name, args, self.env, self.temp_dir)
        self.workers.append(node)
        return node

    def kill_worker(self, index: int) -> None:
        """SIGKILL one worker node's whole process group: a machine lost mid-job."""
        node = self.workers[index]
        _kill_group(node.process, signal.SIGKILL)
        node.process.wait(timeout=STOP_TIMEOUT_S)


# ``ray start`` has the same fixed 30 s raylet deadline as ray.init: the same retry rule.


def _start(name: str, args: list[str], env: dict[str, str], temp_dir: Path) -> Node:
    """``ray start --block`` in a new session (own process group); returns once it is up.

    Retried only when Ray's own start-up deadline ran out; any other failure raises at once.
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return _start_once(name, args, env, temp_dir)
        except RuntimeError as exc:
            if attempt == START_ATTEMPTS or STARTUP_TIMED_OUT not in str(exc):
                raise
    raise AssertionError("unreachable")


def _start_once(name: str, args: list[str], env: dict[str, str], temp_dir: Path) -> Node:
    log = temp_dir / f"{name}.log"
    with log.open("wb") as fh:
        process = subprocess.Popen(
            [*_RAY, *args, "--block"],
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    node = Node(name, process, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in node.output():
        if process.poll() is not None or time.monotonic() > deadline:
            _kill_group(process, signal.SIGKILL)
            raise RuntimeError(f"ray start for {name} failed:\n{node.output()[-4000:]}")
        time.sleep(0.5)
    return node


def _kill_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)  # start_new_session: pgid == pid


def _ours(temp_dir: Path) -> list[int]:
    """Pids whose command line names our private temp dir: raylets, GCS, agents, Ray workers.

    Read from /proc (Linux), since psutil is not a dependency of this project.
    """
    marker = str(temp_dir).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """True for a running process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _teardown(nodes: list[Node], temp_dir: Path) -> None:
    """Stop workers first, then the head (a head lost first makes workers retry for long)."""
    for node in [*reversed(nodes[1:]), *nodes[:1]]:
        if node.process.poll() is None:
            _kill_group(node.process, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for node in nodes:
        _kill_group(node.process, signal.SIGKILL)  # children left in the group
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.process.wait(timeout=5)
    for pid in _ours(temp_dir):  # anything that left our groups (e.g. daemonised helpers)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    survivors = [pid for pid in _ours(temp_dir) if _alive(pid)]
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = [pid for pid in _ours(temp_dir) if _alive(pid)]
    if survivors:
        raise RuntimeError(f"Ray processes of the test cluster survived teardown: {survivors}")


def cluster_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for nodes and drivers: ours (S3 endpoint, fake AWS creds), minus any
    pointer at another Ray instance."""
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "RAY_NAMESPACE"):
        env.pop(var, None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.setdefault("RAY_AUTH_MODE", "disabled")  # as conftest; a token mode needs a token file
    env.update(extra or {})
    return env


@contextlib.contextmanager
def local_cluster(
    tmp_path: Path | None = None,
    workers: int = 2,
    gpus_per_worker: float = 1,
    cpus_per_worker: float = 1,
    resources: dict[str, float] | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[LocalCluster]:
    """A head (no CPUs: it schedules nothing) and ``workers`` worker nodes on 127.0.0.1.

    Workers declare ``gpus_per_worker`` logical GPUs and ``resources`` (default
    ``{"dfr_worker": 1}``). The temp dir is short on purpose (Unix socket paths are limited to
    107 bytes), so it lives under the system temp dir rather than under ``tmp_path``; the node
    logs are copied to ``tmp_path`` at teardown for post-mortems. Always torn down on exit,
    also on failure; raises if any of its processes survives.
    """
    resources = {"dfr_worker": 1} if resources is None else resources
    temp_dir = Path(tempfile.mkdtemp(prefix="dfrc-", dir="/tmp"))
    env = cluster_env(env)
    port = free_port()
    nodes: list[Node] = []
    cluster: LocalCluster | None = None
    try:
        head_args = [
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--node-name=dfr-head",
            f"--temp-dir={temp_dir}",
            "--num-cpus=0",
            "--num-gpus=0",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--include-dashboard=false",
            "--disable-usage-stats",
            *_node_ports(),
        ]
        nodes.append(_start("dfr-head", head_args, env, temp_dir))
        worker_args = [
            f"--num-cpus={cpus_per_worker:g}",
            f"--num-gpus={gpus_per_worker:g}",
            f"--resources={json.dumps(resources)}",
            f"--object-store-memory={OBJECT_STORE_BYTES}",
            "--disable-usage-stats",
        ]
        cluster = LocalCluster(
            address=f"127.0.0.1:{port}",
            temp_dir=temp_dir,
            env=env,
            head=nodes[0],
            _worker_args=worker_args,
        )
        for _ in range(workers):
            cluster.add_worker()
        cluster.wait_for_nodes(1 + workers)
        yield cluster
    finally:
        if cluster is not None:
            nodes = [cluster.head, *cluster.workers]  # including workers added by the test
        try:
            _teardown(nodes, temp_dir)
        finally:
            if tmp_path is not None:
                for node in nodes:
                    with contextlib.suppress(OSError):
                        shutil.copy(node.log, Path(tmp_path) / node.log.name)
            shutil.rmtree(temp_dir, ignore_errors=True)
