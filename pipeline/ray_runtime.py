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


def init_ray(address: str | None, **kwargs: Any) -> bool:
    """``ray.init`` unless already connected; True when this call connected (caller shuts down).

    Extra keyword arguments go to ``ray.init``; ``include_dashboard=False`` and
    ``logging_level=WARNING`` are the defaults.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_default_auth_notice()
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    local = address in (None, "local")
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
