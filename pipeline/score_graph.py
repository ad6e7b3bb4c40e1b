"""The Ray Data graph of the scoring job: read + decode tasks, then the scoring actor pool.

Kept apart from the job's bookkeeping (score_job) so that the graph Ray will execute can be
built and inspected (``Dataset.explain()``) without running it: the tests check on the built
plan that decoding is never fused into the scoring actors.
"""

from __future__ import annotations

import warnings
from typing import Any

import pyarrow as pa

from pipeline.io_stages import DecodeConfig, ReadConfig, decode_batch, read_batch
from pipeline.resources import ResourcePlan
from pipeline.scoring_config import ScoringConfig


class ScoringActor:
    """What the actor pool runs: builds pipeline.score_stages.ScoringActor inside the actor.

    The driver passes this class to Ray Data; importing the real one would import torch into
    the driver (~1 GB of RSS), which only the actors need. Ray pickles this class by reference,
    so the actor process imports score_stages (and torch) when it is constructed.
    """

    def __init__(self, config: ScoringConfig) -> None:
        from pipeline.score_stages import ScoringActor as Model

        self.model = Model(config)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.model(batch)


def build_dataset(
    blocks: list[pa.Table],
    read: ReadConfig,
    decode: DecodeConfig,
    scoring: ScoringConfig,
    plan: ResourcePlan,
    batch_size: int,
) -> Any:
    """blocks -> read -> decode (tasks, torch-free) -> ScoringActor pool; not yet executed."""
    import ray
    from ray.data import ActorPoolStrategy

    # Equal remote args would let Ray fuse decoding into the actors; the memory reservation
    # (which the actors do not declare) keeps the stages apart, see pipeline.resources.
    task_args = {"num_cpus": plan.decode_cpus, "memory": plan.decode_memory}
    ds = ray.data.from_arrow(blocks)
    for fn, cfg in ((read_batch, read), (decode_batch, decode)):
        ds = ds.map_batches(
            fn, fn_kwargs={"config": cfg}, batch_format="pyarrow", batch_size=batch_size,
            **task_args,
        )  # fmt: skip
    with warnings.catch_warnings():
        # max_restarts has no named parameter yet (Ray 2.60 deprecates **ray_remote_args
        # without a replacement for it); the deprecation line would print on every run.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            ScoringActor,
            fn_constructor_kwargs={"config": scoring},
            compute=_actor_pool(ActorPoolStrategy, plan, _bundles(blocks, batch_size)),
            batch_format="pyarrow",
            batch_size=batch_size,
            num_cpus=plan.cpus_per_actor,
            num_gpus=plan.gpus_per_actor,
            # Ray Data passes its own object-store refs to every actor constructor; with
            # restarts on, Ray logs an error-level "constructor arguments in the object store
            # and max_restarts > 0" line on every run (ray-project/ray#53727, #57733). A dead
            # actor fails the execution instead and the run resumes from its committed
            # shards (pipeline.score_resume), which is what a restart would do anyway.
            max_restarts=0,
        )


def _bundles(blocks: list[pa.Table], batch_size: int) -> int:
    """How many inputs the actor stage is sure to get (at least 1).

    Ray Data bundles blocks in arrival order until a bundle holds ``batch_size`` rows, so a
    small night arrives as fewer bundles than blocks, and a short block merges into the next
    one (a one-image line listed before an eight-image line: one bundle of nine at batch 4).
    The decode tasks get the blocks in listing order; their outputs reach the actors in any
    order, where a short output can join any full one, so only the full bundles of the listing
    order are sure to stay apart.
    """
    full, pending = 0, 0
    for block in blocks:
        pending += block.num_rows
        if pending >= max(1, batch_size):
            full, pending = full + 1, 0
    return max(1, full)


def _actor_pool(strategy: Any, plan: ResourcePlan, n_inputs: int) -> Any:
    """The plan's actor pool, never larger than the inputs the wave can give it.

    A pool whose minimum exceeds its inputs cannot use the extra actors, and Ray Data warns
    about it on every such run ("minimum number of concurrent actors ... only received 1
    input(s)"), a warning-level line a user cannot act on (a small night, the demo).
    """
    max_size = max(1, min(plan.max_actors, n_inputs))
    return strategy(min_size=min(plan.min_actors, max_size), max_size=max_size)


def physical_plan(ds: Any) -> str:
    """The optimised physical plan Ray Data will run (the part after its last header)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()
    return out.getvalue().rsplit("-------- Physical Plan (Optimized) --------", 1)[-1].strip()
