"""Bad models in the registry are refused with a clear error, and weights are never unpickled.

A registry is storage other people write to, so a version may be tampered with (wrong
checksum), damaged (a missing file), written by a newer release (newer format), or hostile (a
pickle payload that runs code on load). Each case is tried through the path the jobs use,
``registry.fetch`` then ``artifact.load_model`` (and the scoring job's ``resolve_model``, which
turns it into ``model_error`` rows), on local storage and on the moto S3 server.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dfr_core.artifact import (
    CONFIG_FILE,
    FORMAT_VERSION,
    HEAD_FILE,
    ArtifactError,
    load_model,
    sha256_bytes,
)
from pipeline import registry, storage
from pipeline.score_job import ScoreJobConfig, resolve_model
from pipeline.storage import StorageOptions

REPO = Path(__file__).resolve().parents[2]
LINE = "metal_plate"


class _Payload:
    """Pickles to "call os.makedirs(marker)": proof of code execution if it is ever unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, make_artifact) -> Path:
    """A real (untrained, calibrated) model directory, as train_job would publish it."""
    return make_artifact(tmp_path_factory.mktemp("artifact"))


def _published(artifact: Path, models_uri: str) -> tuple[str, str]:
    """Publish the good artifact; returns (version, version URI) for tampering with."""
    version = registry.publish(artifact, models_uri, LINE)
    return version, registry.version_uri(models_uri, LINE, version)


def _meta(version_uri: str) -> dict:
    return json.loads(storage.read_text(storage.join_uri(version_uri, CONFIG_FILE)))


def _put_meta(version_uri: str, meta: dict) -> None:
    storage.write_text_atomic(storage.join_uri(version_uri, CONFIG_FILE), json.dumps(meta))


def _refused(models_uri: str, version: str, cache: Path) -> str:
    """The error message for fetching + loading ``version``; fails if it loads."""
    with pytest.raises(ArtifactError) as info:
        load_model(registry.fetch(models_uri, LINE, version, cache))
    return str(info.value)


def _model_error(models_uri: str, cache: Path) -> str:
    """What the scoring job's planning makes of the line's LATEST (a model_error, never a crash)."""
    config = ScoreJobConfig(
        models_uri=models_uri,
        input_uri=models_uri,
        output_uri=str(cache / "out"),
        run_date="2024-05-01",
        cache_dir=str(cache / "score-cache"),
    )
    pinned = resolve_model(config, LINE, StorageOptions.from_env())
    assert pinned.error_reason == "model_error", pinned
    return pinned.error or ""


def test_good_model_loads(artifact: Path, models_uri: str, tmp_path: Path) -> None:
    """The baseline: the untampered version fetches, loads and pins (so refusals below are due
    to the tampering alone)."""
    version, _ = _published(artifact, models_uri)
    loaded = load_model(registry.fetch(models_uri, LINE, version, tmp_path / "cache"))
    assert loaded.calibration is not None
    config = ScoreJobConfig(
        models_uri=models_uri,
        input_uri=models_uri,
        output_uri=str(tmp_path / "out"),
        run_date="2024-05-01",
        cache_dir=str(tmp_path / "score-cache"),
    )
    pinned = resolve_model(config, LINE, StorageOptions.from_env())
    assert (pinned.version, pinned.error_reason) == (version, None)


def test_wrong_checksum_is_refused(artifact: Path, models_uri: str, tmp_path: Path) -> None:
    version, uri = _published(artifact, models_uri)
    head = bytearray(storage.read_bytes(storage.join_uri(uri, HEAD_FILE)))
    head[-1] ^= 0xFF
    storage.write_bytes_atomic(storage.join_uri(uri, HEAD_FILE), bytes(head))

    message = _refused(models_uri, version, tmp_path / "cache")
    assert message.endswith(f"{HEAD_FILE}: sha256 mismatch with {CONFIG_FILE}")
    assert "sha256 mismatch" in _model_error(models_uri, tmp_path)
    assert not (tmp_path / "cache" / LINE / version).exists()  # nothing unverified is cached


def test_missing_file_is_refused(artifact: Path, models_uri: str, tmp_path: Path) -> None:
    version, uri = _published(artifact, models_uri)
    storage.remove_tree(storage.join_uri(uri, HEAD_FILE))

    message = _refused(models_uri, version, tmp_path / "cache")
    assert message.endswith(f"{HEAD_FILE}: missing (listed in {CONFIG_FILE})")
    assert "missing" in _model_error(models_uri, tmp_path)


def test_newer_format_is_refused(artifact: Path, models_uri: str, tmp_path: Path) -> None:
    version, uri = _published(artifact, models_uri)
    meta = _meta(uri)
    meta["format_version"] = FORMAT_VERSION + 1
    _put_meta(uri, meta)

    message = _refused(models_uri, version, tmp_path / "cache")
    assert f"format_version {FORMAT_VERSION + 1} is newer than this library supports" in message
    assert "upgrade dfr-pipeline" in message
    assert "is newer than this library supports" in _model_error(models_uri, tmp_path)


def test_pickle_payload_is_refused_and_never_executed(
    artifact: Path, models_uri: str, tmp_path: Path
) -> None:
    """The attacker controls both files, so the checksum matches: only weights_only loading
    stands between the payload and code execution."""
    version, uri = _published(artifact, models_uri)
    marker = tmp_path / "payload-ran"
    hostile = tmp_path / "hostile.pt"
    state = torch.load(artifact / HEAD_FILE, weights_only=True)
    state["payload"] = _Payload(str(marker))
    torch.save(state, hostile)
    data = hostile.read_bytes()
    storage.write_bytes_atomic(storage.join_uri(uri, HEAD_FILE), data)
    meta = _meta(uri)
    meta["files"][HEAD_FILE] = sha256_bytes(data)
    _put_meta(uri, meta)

    message = _refused(models_uri, version, tmp_path / "cache")
    assert f"{HEAD_FILE}: not a plain tensor state dict" in message
    assert "not a plain tensor state dict" in _model_error(models_uri, tmp_path)
    assert not marker.exists()


def _torch_load_calls() -> list[tuple[str, ast.Call]]:
    calls = []
    for package in ("dfr_core", "pipeline"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"
                ):
                    calls.append((f"{path.relative_to(REPO)}:{node.lineno}", node))
    return calls


def test_every_torch_load_is_weights_only() -> None:
    """Source check: each torch.load in the libraries passes the literal weights_only=True, and
    nothing unpickles directly (pickle/dill/joblib loads)."""
    calls = _torch_load_calls()
    assert len(calls) >= 2  # the head (artifact.py) and backbone weights (backbones/weights.py)
    for where, call in calls:
        flags = {kw.arg: kw.value for kw in call.keywords}
        value = flags.get("weights_only")
        assert isinstance(value, ast.Constant) and value.value is True, where
    for package in ("dfr_core", "pipeline"):
        for path in (REPO / package).rglob("*.py"):
            source = path.read_text()
            for needle in ("pickle.load", "dill.load", "joblib.load", "import pickle"):
                assert needle not in source, f"{path.relative_to(REPO)}: {needle}"
