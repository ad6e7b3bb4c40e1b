"""Ray start-up drops only Ray's notice that it enabled its default token authentication; the
auth mode itself is left to Ray (no Ray starts here: ray.init is replaced)."""

from __future__ import annotations

import logging
import os

from pipeline import ray_runtime


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_only_the_auto_enabled_notice_is_dropped(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    before = os.environ.get("RAY_AUTH_MODE")
    assert ray_runtime.init_ray("local")
    assert calls[0]["address"] == "local" and calls[0]["include_dashboard"] is False
    assert os.environ.get("RAY_AUTH_MODE") == before  # the mode is Ray's decision
    logger = logging.getLogger(ray_runtime.AUTH_LOGGER)
    collect = _Collect()
    logger.addHandler(collect)
    try:
        logger.warning(
            "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled"
        )
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone ...")
    finally:
        logger.removeHandler(collect)
    messages = collect.messages
    assert len(messages) == 1 and "disabled for this Ray cluster" in messages[0]
    ray_runtime.init_ray("local")
    assert logger.filters.count(ray_runtime._NOTICE_FILTER) == 1


def test_address_means_the_same_for_every_command(monkeypatch):
    """Omitted: a private local Ray even when RAY_ADDRESS names a cluster; 'auto' joins it."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs["address"]))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    for address in (None, "auto", "ray://head:10001"):
        assert ray_runtime.ensure_ray(address)
    assert calls == ["local", "auto", "ray://head:10001"]


def test_train_and_score_share_one_address_option():
    from pipeline.cli import main

    helps = {
        name: next(p.help for p in main.commands[name].params if p.name == "address")
        for name in ("train", "score")
    }
    assert helps["train"] == helps["score"] == ray_runtime.ADDRESS_HELP
    score_flags = {o for p in main.commands["score"].params for o in p.opts}
    assert "--s3-endpoint-url" in score_flags


def _failing_init(failures: list[str], calls: list[dict]):
    def init(**kwargs):
        calls.append(kwargs)
        if failures:
            raise Exception(failures.pop(0))  # what Ray raises for its start-up deadline

    return init


def test_a_local_start_is_retried_only_on_rays_startup_deadline(monkeypatch):
    import pytest
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    timed_out = "The current node timed out during startup. This could happen because ..."
    calls: list[dict] = []
    monkeypatch.setattr(ray, "init", _failing_init([timed_out, timed_out], calls))
    assert ray_runtime.init_ray("local") and len(calls) == 3  # two deadlines, then up
    calls.clear()
    monkeypatch.setattr(ray, "init", _failing_init([timed_out] * 3, calls))
    with pytest.raises(Exception, match="timed out during startup"):
        ray_runtime.init_ray("local")
    assert len(calls) == ray_runtime.START_ATTEMPTS
    calls.clear()
    monkeypatch.setattr(ray, "init", _failing_init(["some other failure"], calls))
    with pytest.raises(Exception, match="some other failure"):
        ray_runtime.init_ray("local")
    assert len(calls) == 1  # anything else fails at once
    calls.clear()
    monkeypatch.setattr(ray, "init", _failing_init([timed_out], calls))
    with pytest.raises(Exception, match="timed out"):
        ray_runtime.init_ray("head:6379")
    assert len(calls) == 1  # joining a cluster is never retried


def test_a_private_local_ray_gets_a_store_sized_for_the_machine(monkeypatch):
    """Per CPU, at least 1 GiB, never above Ray's default (30 % of RAM) or /dev/shm; a cluster
    join passes nothing (the cluster's store is the cluster's)."""
    import ray

    gib = 2**30
    size = ray_runtime.local_object_store_bytes
    assert size(cpus=2, ram=24 * gib, shm=12 * gib) == gib
    assert size(cpus=8, ram=64 * gib, shm=32 * gib) == 4 * gib
    assert size(cpus=64, ram=64 * gib, shm=32 * gib) is None  # Ray's default is smaller
    assert size(cpus=8, ram=64 * gib, shm=2 * gib) is None  # a small /dev/shm: Ray's default
    assert size(cpus=2, ram=2 * gib, shm=gib) is None
    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray_runtime, "local_object_store_bytes", lambda: 3 * gib)
    ray_runtime.ensure_ray(None)
    ray_runtime.ensure_ray("auto")
    ray_runtime.ensure_ray(None, object_store_memory=gib)  # an explicit size wins
    assert [c.get("object_store_memory", "-") for c in calls] == [3 * gib, "-", gib]
