"""Ray start-up for the CLI commands: one place that decides how ``ray.init`` is called.

``--address`` means the same for every command (train, score, nightly, demo), documented here
once (`ADDRESS_HELP`, docs/scaling.md):

* omitted (None): a private local Ray, started for this command and shut down after it, even
  when ``RAY_ADDRESS`` is set or a ``ray start`` cluster runs on this machine: a command without
  ``--address`` is self-contained and never lands on a cluster by accident;
* ``auto``: join the cluster named by ``RAY_ADDRESS``, or the one ``ray start`` runs here (what a
  job submitted to a cluster uses: ``ray job submit -- dfr-pipeline ... --address auto``);
* ``host:port`` joins that cluster's GCS, ``ray://host:10001`` connects through Ray Client.

A process already connected (a test, the demo, a notebook) is left connected as it is.

A private local Ray gets an object store sized for one job on this machine
(`local_object_store_bytes`), not Ray's default of 30 % of RAM: the store's shared pages, once
written, stay resident up to its high-water mark for as long as the command runs, and a scoring
job streams its blocks through whatever room it is given (BENCHMARKS.md, "Throughput").

Why it exists: a newcomer's successful ``dfr-pipeline train``/``score``/``demo`` must not print
warnings they cannot act on. Ray 2.60 logs "Token authentication is enabled for this Ray
cluster. Set RAY_AUTH_MODE=disabled to opt out" every time it starts a new local cluster with
``RAY_AUTH_MODE`` unset, although token authentication is its (secure) default and nothing is
wrong. We keep that default and drop only that notice. Setting ``RAY_AUTH_MODE=token`` ourselves
would not do: Ray reads its config at import, so the driver would not create the token that the
GCS it starts then requires (the GCS aborts). Ray's warning that authentication is *disabled*,
and every other line, are left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

#: The help text of every command's --address option.
ADDRESS_HELP = (
    "Ray cluster to join: 'auto' (RAY_ADDRESS or the `ray start` cluster here), host:port or "
    "ray://host:10001; omitted: a private local Ray for this command."
)
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
#: ``ray.init`` gives a new local raylet a fixed 30 s to register with its GCS
#: (ray/_private/node.py, not configurable); on a machine whose cores are all busy (a laptop
#: running other work, a loaded CI box) that can run out. Only that failure is retried, and only
#: for a Ray this call starts itself; joining a cluster fails at once.
START_ATTEMPTS = 3
STARTUP_TIMED_OUT = "timed out during startup"
AUTO_ENABLED_NOTICE = "Token authentication is enabled for this Ray cluster"
#: Object store of a private local Ray per CPU, and at least LOCAL_STORE_MIN: Ray Data keeps
#: half of it for blocks in flight (a few decoded blocks per decode task and actor), which
#: keeps every CPU busy (measured: BENCHMARKS.md, "Throughput"); never more than Ray's default.
LOCAL_STORE_PER_CPU = 512 * 2**20
LOCAL_STORE_MIN = 2**30
#: Ray's own default share of RAM for the object store (ray_constants, 0.3)
RAY_DEFAULT_STORE_SHARE = 0.3


class _DropAutoEnabledNotice(logging.Filter):
    """Drops Ray's notice that it enabled its default token authentication."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(AUTO_ENABLED_NOTICE)


_NOTICE_FILTER = _DropAutoEnabledNotice()


def quiet_default_auth_notice() -> None:
    """Install the filter (idempotent)."""
    logger = logging.getLogger(AUTH_LOGGER)
    if _NOTICE_FILTER not in logger.filters:
        logger.addFilter(_NOTICE_FILTER)


def local_object_store_bytes(
    cpus: int | None = None, ram: int | None = None, shm: int | None = None
) -> int | None:
    """The object store for a private local Ray on this machine, or None for Ray's default
    when that is smaller (a machine with little RAM for its CPUs). Also kept within /dev/shm,
    as Ray's default is, so the store never falls back to a disk-backed file."""
    cpus = cpus or os.cpu_count() or 1
    ram = ram if ram is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if shm is None and os.path.isdir("/dev/shm"):
        stat = os.statvfs("/dev/shm")
        shm = stat.f_bavail * stat.f_frsize
    cap = max(LOCAL_STORE_MIN, cpus * LOCAL_STORE_PER_CPU)
    limit = min(RAY_DEFAULT_STORE_SHARE * ram, 0.95 * shm if shm else float("inf"))
    return cap if cap < limit else None


def init_ray(address: str | None, **kwargs: Any) -> bool:
    """``ray.init`` unless already connected; True when this call connected (caller shuts down).

    Extra keyword arguments go to ``ray.init``; ``include_dashboard=False`` and
    ``logging_level=WARNING`` are the defaults, and a private local Ray's
    ``object_store_memory`` is `local_object_store_bytes`.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_default_auth_notice()
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    local = address in (None, "local")
    if local and "object_store_memory" not in kwargs:
        kwargs["object_store_memory"] = local_object_store_bytes()
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(address=address, **kwargs)
            return True
        except Exception as exc:  # Ray raises a bare Exception for its start-up deadline
            if not local or attempt == START_ATTEMPTS or STARTUP_TIMED_OUT not in str(exc):
                raise
            ray.shutdown()  # whatever the failed start left connected
    raise AssertionError("unreachable")


def ensure_ray(address: str | None, **kwargs: Any) -> bool:
    """Connect as ``--address`` says (see the module docstring); True when this call connected,
    so the caller shuts Ray down."""
    return init_ray(address or "local", **kwargs)
