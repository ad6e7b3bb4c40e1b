"""The environment the suite's Ray workers run in (what tests/conftest.py promises them)."""

from __future__ import annotations

import os
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


def test_workers_run_at_normal_priority_and_see_the_s3_endpoint(
    ray_session: Any, s3_server: Any
) -> None:
    """Niceness 0 (Ray's default 15 starves workers on a busy machine) and the test endpoint."""
    import ray

    def _worker_view() -> tuple[int, str | None]:
        # defined here so cloudpickle ships it by value (workers cannot import test modules)
        return os.nice(0), os.environ.get("DFR_S3_ENDPOINT_URL")

    niceness, endpoint = ray.get(ray.remote(num_cpus=0.25)(_worker_view).remote())
    assert niceness == 0
    assert endpoint == s3_server.endpoint_url
