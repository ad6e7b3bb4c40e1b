"""Ray start-up for the CLI commands: one place that decides how ``ray.init`` is called.

Why it exists: a newcomer's successful ``dfr-pipeline train``/``score``/``demo`` must not print
warnings they cannot act on. Ray 2.60 warns "Token authentication is enabled for this Ray
cluster. Set RAY_AUTH_MODE=disabled to opt out" every time it starts a *new local* cluster with
``RAY_AUTH_MODE`` unset, although that is its default. We keep the secure default and only make
the choice explicit (``RAY_AUTH_MODE=token``) for a cluster this process starts itself; an
explicit ``RAY_AUTH_MODE`` (the tests set ``disabled``) and clusters we join are left alone.
"""

from __future__ import annotations

import logging
import os
from typing import Any

AUTH_MODE_VAR = "RAY_AUTH_MODE"


def starts_local_cluster(address: str | None) -> bool:
    """True when ``ray.init(address=address)`` would start a new local Ray instance."""
    if address == "local":
        return True
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) is None
    except Exception:  # private API moved, or an address it cannot parse: do not guess
        return False


def init_ray(address: str | None, **kwargs: Any) -> bool:
    """``ray.init`` unless already connected; True when this call connected (caller shuts down).

    Extra keyword arguments go to ``ray.init``; ``include_dashboard=False`` and
    ``logging_level=WARNING`` are the defaults.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if AUTH_MODE_VAR not in os.environ and starts_local_cluster(address):
        os.environ[AUTH_MODE_VAR] = "token"  # Ray's own default, stated so it does not warn
    kwargs.setdefault("include_dashboard", False)
    kwargs.setdefault("logging_level", logging.WARNING)
    ray.init(address=address, **kwargs)
    return True
