"""Ray start-up states Ray's token-auth default for clusters we start (no warning), and leaves an
explicit RAY_AUTH_MODE and clusters we join alone. ray.init is replaced: no Ray starts here."""

from __future__ import annotations

import os

import pytest

from pipeline import ray_runtime


@pytest.fixture
def fake_init(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_local_cluster_gets_token_mode_stated(fake_init, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    assert ray_runtime.init_ray("local")
    assert fake_init[0]["address"] == "local" and fake_init[0]["include_dashboard"] is False
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_explicit_mode_and_joined_clusters_are_left_alone(fake_init, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_runtime.init_ray("local")
    assert os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert not ray_runtime.starts_local_cluster("10.0.0.1:6379")
    ray_runtime.init_ray("10.0.0.1:6379")
    assert "RAY_AUTH_MODE" not in os.environ
