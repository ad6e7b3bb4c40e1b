"""Resource sizing of the scoring job: actors, CPUs/GPUs per actor, decode tasks, torch threads.

Whatever the user does not give is sized from the cluster (`ClusterShape.from_ray`):

- GPUs in the cluster: one GPU per actor, one actor per GPU, 1 CPU and 1 torch thread each
  (the GPU does the model's work; the CPU only feeds it).
- CPU only: per node, one single-threaded actor per CPU left after a decode reserve (1/8 of
  the node, at least 0.25), sharing those CPUs (on 2 cores: 2 actors x 0.875 CPUs, 1 torch
  thread each, decode tasks of 0.25 CPU). Why not one multi-threaded actor: its intra-op
  threads meet at a barrier after every operation, so whenever a decode task or a Ray process
  takes a core, the other thread waits; measured on 2 cores (`benchmarks/throughput.py`), one
  2-thread actor kept 65-80 % of the bare model's throughput, two 1-thread actors 98-116 %.
  Each actor holds torch and its models (~1 GB), so a node gets at most one actor per
  ``ACTOR_MEMORY`` of its Ray memory; the actors' torch threads then share the node's CPUs.

Decoding never runs in a scoring actor: Ray Data fuses adjacent map stages whose remote args
are equal (same CPUs, GPUs, resources), so the read/decode stage also declares the memory one
decode may need (``decode_memory``), which the actors do not: the stages stay separate whatever
CPU figures a user passes. `tests/integration/test_score_plan.py` checks the built plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTOR_CPUS_TARGET = 1  # CPUs per CPU-only actor: single-threaded actors (module docstring)
ACTOR_MEMORY = 1.5 * 2**30  # node memory per CPU-only actor (torch + models + a batch: ~1 GB)
DECODE_CPUS = 0.25  # per read/decode task: decoding a batch is short and mostly single-threaded


@dataclass(frozen=True)
class ClusterShape:
    """CPUs and GPUs of each alive node that can run work (nodes without CPUs are skipped)."""

    node_cpus: tuple[float, ...]
    node_gpus: tuple[float, ...]
    node_memory: tuple[float, ...] = ()  # bytes Ray may give tasks and actors; () = unknown

    @classmethod
    def from_ray(cls) -> ClusterShape:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        return cls(
            tuple(float(n["Resources"].get("CPU", 0)) for n in nodes),
            tuple(float(n["Resources"].get("GPU", 0)) for n in nodes),
            tuple(float(n["Resources"].get("memory", 0)) for n in nodes),
        )


@dataclass(frozen=True)
class ResourceRequest:
    """The user's figures; None: size it from the cluster."""

    min_actors: int | None = None
    max_actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    decode_cpus: float | None = None
    torch_threads: int | None = None


@dataclass(frozen=True)
class ResourcePlan:
    min_actors: int
    max_actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    decode_cpus: float
    torch_threads: int
    decode_memory: int  # bytes reserved per read/decode task (see the module docstring)

    def describe(self) -> str:
        pool = (
            str(self.max_actors)
            if self.min_actors == self.max_actors
            else f"{self.min_actors}-{self.max_actors}"
        )
        gpu = f", {self.gpus_per_actor:g} GPU" if self.gpus_per_actor else ""
        return (
            f"{pool} scoring actor(s) x {self.cpus_per_actor:g} CPU{gpu}, "
            f"{self.torch_threads} torch thread(s); decode tasks {self.decode_cpus:g} CPU, "
            f"{self.decode_memory / 2**20:.0f} MiB"
        )


def decode_memory_bytes(max_pixels: int) -> int:
    """What one decode may hold at the pixel cap: RGBA bytes plus a float32 RGB copy."""
    return max(256 * 2**20, max_pixels * (4 + 12))


def plan_resources(
    request: ResourceRequest, cluster: ClusterShape, max_pixels: int
) -> ResourcePlan:
    """Fill in every figure the request leaves open (see the module docstring)."""
    gpus = sum(cluster.node_gpus)
    cpu_nodes = max(1, len(cluster.node_cpus))
    node = min(cluster.node_cpus) if cluster.node_cpus else 1.0
    gpu_actors = request.gpus_per_actor if request.gpus_per_actor is not None else None
    use_gpu = (gpu_actors is None and gpus >= 1) or bool(gpu_actors)
    decode = request.decode_cpus if request.decode_cpus is not None else DECODE_CPUS
    if use_gpu:
        per_gpu = gpu_actors or 1.0
        cpus = request.cpus_per_actor if request.cpus_per_actor is not None else 1.0
        default_actors = max(1, int(gpus // per_gpu))
        threads = max(1, int(cpus))
    else:
        per_gpu = 0.0
        reserve = max(DECODE_CPUS, node / 8)
        per_node = max(1, round((node - reserve) / ACTOR_CPUS_TARGET))
        if cluster.node_memory and min(cluster.node_memory) > 0:
            per_node = max(1, min(per_node, int(min(cluster.node_memory) // ACTOR_MEMORY)))
        if request.cpus_per_actor is not None:
            cpus = request.cpus_per_actor
            if request.max_actors is None:
                per_node = max(1, math.floor((node - reserve) / max(cpus, 1e-9)))
        elif request.max_actors is not None:
            per_node = max(1, math.ceil(request.max_actors / cpu_nodes))
            cpus = max(0.25, (node - reserve) / per_node)
        else:
            cpus = max(0.25, (node - reserve) / per_node)
        default_actors = per_node * cpu_nodes
        threads = max(1, round(node / per_node))
    max_actors = request.max_actors if request.max_actors is not None else default_actors
    min_actors = request.min_actors if request.min_actors is not None else max_actors
    return ResourcePlan(
        min_actors=min(min_actors, max_actors),
        max_actors=max_actors,
        cpus_per_actor=round(cpus, 3),
        gpus_per_actor=per_gpu,
        decode_cpus=decode,
        torch_threads=request.torch_threads or threads,
        decode_memory=decode_memory_bytes(max_pixels),
    )
