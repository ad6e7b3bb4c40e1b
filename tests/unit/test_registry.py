"""Model registry contracts on local storage and on the moto S3 server: round trips, ordering,
immutability, and that LATEST never names an incomplete version, even after a crash."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from dfr_core.artifact import (
    CONFIG_FILE,
    HEAD_FILE,
    ArtifactError,
    load_head,
    load_model,
)
from dfr_core.calibrate import Calibration
from pipeline import registry, storage
from pipeline.registry import (
    LATEST,
    fetch,
    latest_version,
    list_product_lines,
    list_versions,
    new_version,
    publish,
    resolve_weights,
    version_uri,
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory, make_artifact) -> Path:
    """A real (untrained) model directory: head.pt + model.json with checksums."""
    return make_artifact(tmp_path_factory.mktemp("artifact"), extra={"product_line": "metal"})


def test_new_version_is_sortable_and_safe() -> None:
    versions = [new_version() for _ in range(20)]
    assert len(set(versions)) == 20
    for v in versions:
        assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", v)
        assert storage.safe_component(v) == v


def test_version_uri_rejects_unsafe_names() -> None:
    assert version_uri("s3://b/m", "metal", "v1") == "s3://b/m/metal/v1"
    for line, version in (("a/b", "v1"), ("..", "v1"), ("a", "../x"), ("a", LATEST), ("a", ".t")):
        with pytest.raises(ValueError):
            version_uri("s3://b/m", line, version)


def test_publish_fetch_round_trip(artifact: Path, models_uri: str, tmp_path: Path) -> None:
    assert list_product_lines(models_uri) == []
    assert latest_version(models_uri, "metal") is None
    assert list_versions(models_uri, "metal") == []

    v1 = publish(artifact, models_uri, "metal", version="20260101T000000Z-000001")
    v2 = publish(artifact, models_uri, "metal")
    publish(artifact, models_uri, "tile")
    assert v1 == "20260101T000000Z-000001"
    assert list_product_lines(models_uri) == ["metal", "tile"]
    assert list_versions(models_uri, "metal") == [v1, v2]
    assert latest_version(models_uri, "metal") == v2

    local = fetch(models_uri, "metal", v1, tmp_path / "cache")
    assert local == (tmp_path / "cache" / "metal" / v1).resolve()
    assert sorted(p.name for p in local.iterdir()) == [HEAD_FILE, CONFIG_FILE]
    assert (local / HEAD_FILE).read_bytes() == (artifact / HEAD_FILE).read_bytes()
    loaded = load_model(local)
    assert loaded.calibration == Calibration(1.5, 2.5, 0.005, 0.01, 3)
    assert loaded.metadata.extra == {"product_line": "metal"}
    reference = load_head(artifact)
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.model.head.state_dict()[key], value)
    assert registry.read_version_metadata(models_uri, "metal", v2) == json.loads(
        (artifact / CONFIG_FILE).read_text()
    )


def test_versions_are_immutable(artifact: Path, models_uri: str) -> None:
    version = publish(artifact, models_uri, "metal")
    with pytest.raises(FileExistsError, match="immutable"):
        publish(artifact, models_uri, "metal", version=version)
    assert list_versions(models_uri, "metal") == [version]


def test_corrupt_artifact_is_not_published(artifact: Path, models_uri: str, tmp_path: Path):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / HEAD_FILE).write_bytes(b"not the weights")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        publish(bad, models_uri, "metal")
    assert list_product_lines(models_uri) == []


def test_s3_crash_mid_upload_never_exposes_the_version(
    artifact: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    models = f"{s3_bucket}/registry"
    good = publish(artifact, models, "metal")
    real_upload = registry._upload_file

    def crash_after_head(path: Path, uri: str, options: object) -> None:
        if path.name == CONFIG_FILE:
            raise ConnectionError("connection reset while uploading model.json")
        real_upload(path, uri, options)

    monkeypatch.setattr(registry, "_upload_file", crash_after_head)
    # A killed process cleans nothing up: disable the cleanup to see what readers would see.
    monkeypatch.setattr(registry, "_discard_partial", lambda uri, options: None)
    partial = new_version()
    with pytest.raises(ConnectionError):
        publish(artifact, models, "metal", version=partial)
    assert storage.exists(f"{version_uri(models, 'metal', partial)}/{HEAD_FILE}")
    assert latest_version(models, "metal") == good
    assert list_versions(models, "metal") == [good]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        fetch(models, "metal", partial, tmp_path / "cache")

    # With cleanup (a failure the process survives) the partial upload is removed.
    monkeypatch.undo()
    monkeypatch.setattr(registry, "_upload_file", crash_after_head)
    second = new_version()
    with pytest.raises(ConnectionError):
        publish(artifact, models, "metal", version=second)
    assert not storage.exists(version_uri(models, "metal", second))
    assert latest_version(models, "metal") == good


def test_local_crash_leaves_only_an_invisible_temp_dir(
    artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = str(tmp_path / "models")
    good = publish(artifact, models, "metal")
    # What a process killed mid-copy leaves behind: a temp dir with part of the files.
    debris = tmp_path / "models" / "metal" / f"{registry.TMP_PREFIX}{new_version()}"
    debris.mkdir()
    shutil.copy(artifact / HEAD_FILE, debris / HEAD_FILE)
    shutil.copy(artifact / CONFIG_FILE, debris / CONFIG_FILE)
    assert list_versions(models, "metal") == [good]
    assert list_product_lines(models) == ["metal"]

    def fail(directory: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(registry, "_fsync_tree", fail)
    failed = new_version()
    with pytest.raises(OSError, match="disk full"):
        publish(artifact, models, "metal", version=failed)
    assert not (tmp_path / "models" / "metal" / failed).exists()
    assert not (tmp_path / "models" / "metal" / f"{registry.TMP_PREFIX}{failed}").exists()
    assert latest_version(models, "metal") == good


def test_fetch_reuses_a_verified_cache_and_replaces_a_corrupt_one(
    artifact: Path, models_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = publish(artifact, models_uri, "metal")
    cache = tmp_path / "cache"
    first = fetch(models_uri, "metal", version, cache)
    with monkeypatch.context() as m:
        m.setattr(storage, "read_bytes", lambda *a, **k: pytest.fail("downloaded again"))
        # read_text calls the io module's read_bytes directly, not the re-export above.
        m.setattr(storage.io, "read_bytes", lambda *a, **k: pytest.fail("downloaded again"))
        assert fetch(models_uri, "metal", version, cache) == first
    (first / HEAD_FILE).write_bytes(b"tampered")
    again = fetch(models_uri, "metal", version, cache)
    assert (again / HEAD_FILE).read_bytes() == (artifact / HEAD_FILE).read_bytes()


def test_corrupt_latest_is_an_error(artifact: Path, tmp_path: Path) -> None:
    models = str(tmp_path / "models")
    publish(artifact, models, "metal")
    (tmp_path / "models" / "metal" / LATEST).write_text("../../etc\n")
    with pytest.raises(ValueError, match="does not name a valid version"):
        latest_version(models, "metal")


def test_resolve_weights(s3_bucket: str, tmp_path: Path) -> None:
    assert resolve_weights(None, tmp_path) is None
    assert resolve_weights("", tmp_path) is None
    local = tmp_path / "w.pth"
    local.write_bytes(b"weights")
    assert resolve_weights(str(local), tmp_path) == str(local)
    storage.write_bytes_atomic(f"{s3_bucket}/w/backbone.pth", b"remote weights")
    path = resolve_weights(f"{s3_bucket}/w/backbone.pth", tmp_path)
    assert Path(path).read_bytes() == b"remote weights"
    assert Path(path).name == "backbone.pth"


def test_publisher_killed_mid_copy_leaves_no_debris_after_the_next_publish(
    artifact: Path, tmp_path: Path
) -> None:
    """A local publish SIGKILLed after copying (before the rename) leaves its temp version
    directory; the next publish of the line removes it, and a live publisher's is kept."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    models = tmp_path / "models"
    script = (
        "import os, signal, sys\n"
        "from pipeline import registry\n"
        "registry._fsync_tree = lambda d: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"registry.publish({str(artifact)!r}, {str(models)!r}, 'metal')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    killed = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    debris = [p.name for p in (models / "metal").iterdir()]
    assert len(debris) == 1 and debris[0].startswith(".tmp-")
    live = models / "metal" / f".tmp-x@{os.getpid()}@{socket.gethostname()}"
    live.mkdir()  # an in-flight publish by a live process: must survive the sweep
    version = publish(artifact, str(models), "metal")
    assert sorted(p.name for p in (models / "metal").iterdir()) == sorted(
        [version, "LATEST", live.name]
    )


def test_models_list_shows_a_version_it_cannot_read(artifact: Path, tmp_path: Path) -> None:
    """A version written by a newer release is listed by name (its fields empty), and the
    readable versions beside it keep their summaries."""
    models = str(tmp_path / "models")
    good = publish(artifact, models, "metal")
    newer = publish(artifact, models, "metal")
    path = tmp_path / "models" / "metal" / newer / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))
    rows = {r["version"]: r for r in registry.describe(models)}
    assert rows[good]["backbone"] == "mobilenet_v2" and rows[good]["image_threshold"] == 2.5
    assert rows[good]["image_size"] == 64 and rows[good]["latent_dim"] == 8
    assert rows[newer]["latest"] and rows[newer]["backbone"] is None
    assert rows[newer]["metrics"] == {}
