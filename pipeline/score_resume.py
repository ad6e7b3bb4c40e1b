"""Resuming inside a run and tidying after one: what keeps a scoring run exactly-once when
processes die (pipeline.score_job calls these).

* A scoring actor that dies fails one Ray Data execution; the shards committed so far stay
  committed and the next execution scores only the rest (MAX_EXECUTIONS in all). This replaces
  Ray's actor restarts, which the job turns off (see pipeline.score_graph).
* A run killed after its run record but before its clean-up is tidied by its next invocation.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

from pipeline import drift_io, outputs, storage
from pipeline.run_lease import LeaseHeld, RunLease
from pipeline.storage import StorageOptions

logger = logging.getLogger(__name__)

#: Dataset executions per run: a scoring actor that dies (node lost, OOM kill) fails one
#: execution; the next one resumes from the shards committed so far.
MAX_EXECUTIONS = 4

Markers = dict[tuple[str, int], dict[str, Any]]


def is_actor_death(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) says a Ray actor process died."""
    from ray.exceptions import RayActorError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, RayActorError):
            return True
        current = current.__cause__ or current.__context__
    text = f"{type(exc).__name__}: {exc}"
    return "ActorDiedError" in text or "RayActorError" in text


def tidy_committed(output: str, run_date: str, run_id: str, options: StorageOptions) -> None:
    """Finish the clean-up of a committed run whose process was killed after its run record.

    Staging (temp files), its lease and superseded files would otherwise stay until the next
    run of the date with other content. Done only when the date's lease is free: a run in
    flight owns the staging prefix.
    """
    lease = RunLease(output, run_date, run_id, options)
    try:
        lease.acquire()
    except LeaseHeld:
        return
    try:
        record = outputs.read_run_record(output, run_id, options) or {}
        if record.get("run_key"):
            lines = sorted(record.get("files", {}))
            outputs.remove_superseded(output, run_date, record["run_key"], lines, options)
            drift_io.remove_superseded(output, run_date, record["run_key"], lines, options)
        outputs.clear_staging(output, run_date, options)
    finally:
        lease.release()


def score_pending(
    output: str,
    run_date: str,
    slices: dict[tuple[str, int], tuple[int, int]],
    run_key: str,
    options: StorageOptions,
    execute: Callable[[dict[tuple[str, int], tuple[int, int]]], Markers],
) -> tuple[Markers, Markers]:
    """(markers committed before this invocation, markers this invocation committed).

    A scoring actor that dies fails the Ray Data execution; the shards committed so far stay
    committed and the next execution scores only the rest (MAX_EXECUTIONS in all).
    """

    def committed() -> dict[tuple[str, int], dict[str, Any]]:
        found = outputs.committed_shards(output, run_date, run_key, options)
        return {k: v for k, v in found.items() if k in slices}

    done = committed()
    markers = dict(done)
    for attempt in range(1, MAX_EXECUTIONS + 1):
        pending = {k: v for k, v in slices.items() if k not in markers}
        if not pending:
            break
        try:
            markers.update(execute(pending))
            continue
        except Exception as exc:
            if attempt == MAX_EXECUTIONS or not is_actor_death(exc):
                raise
            reason = storage.redact(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        # Out of the except block, the exception and its traceback are gone; their frames hold
        # the failed execution's actor pool in reference cycles, and Ray Data releases those
        # actors only when their handles are collected (it shuts a failed execution down
        # without killing them). Until then they hold their CPUs, which on a small node
        # starves the next execution's decode tasks.
        gc.collect()
        markers = committed()
        logger.warning(
            "a scoring actor died (%s); resuming the %d uncommitted shards (execution %d "
            "of at most %d)",
            reason,
            len(slices) - len(markers),
            attempt + 1,
            MAX_EXECUTIONS,
        )
    new = {k: v for k, v in markers.items() if k not in done}
    return done, new
