"""The versioned model registry: ``{models_uri}/{product_line}/{version}/`` plus ``LATEST``.

A version directory holds a dfr_core artifact (head.pt, model.json with checksums) and is
immutable once visible. Visibility is what makes a crash harmless:

* local storage: the version is written under ``.tmp-{version}`` and renamed into place, so it
  appears complete or not at all;
* S3 (no rename): every other file is uploaded first and ``model.json`` last, and a version
  counts as complete only when its model.json exists (``list_versions``); a failed upload
  removes what it wrote, and a killed process leaves only files that no reader considers.

``LATEST`` (the newest version's name, one line) is written after the version is complete, so
the scoring job, which reads LATEST, can never pick up a half-written model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from dfr_core.artifact_meta import (
    CONFIG_FILE,
    ArtifactError,
    ModelMetadata,
    parse_metadata,
    read_model_metadata,
)
from dfr_core.hashing import sha256_file
from pipeline import storage
from pipeline.run_lease import process_alive
from pipeline.storage import StorageOptions

LATEST = "LATEST"
TMP_PREFIX = ".tmp-"

logger = logging.getLogger(__name__)


def new_version() -> str:
    """A sortable UTC timestamp plus a random suffix, e.g. ``20261128T140512Z-3fa2c1``.

    The suffix keeps two publishes in the same second (parallel jobs) from colliding.
    """
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}Z-{secrets.token_hex(3)}"


def _check_version(version: str) -> str:
    storage.safe_component(version, "model version")
    if version.startswith(".") or version == LATEST:
        raise ValueError(f"invalid model version {version!r}: reserved name")
    return version


def _line_uri(models_uri: str, product_line: str) -> str:
    return storage.join_uri(models_uri, storage.safe_component(product_line, "product line"))


def version_uri(models_uri: str, product_line: str, version: str) -> str:
    """Where one version of a product line's model lives."""
    return storage.join_uri(_line_uri(models_uri, product_line), _check_version(version))


def _is_local(uri: str, options: StorageOptions | None) -> bool:
    return isinstance(storage.get_fs(uri, options)[0], LocalFileSystem)


def latest_version(
    models_uri: str, product_line: str, options: StorageOptions | None = None
) -> str | None:
    """The version named by ``{line}/LATEST``; None when the line has never been published."""
    uri = storage.join_uri(_line_uri(models_uri, product_line), LATEST)
    try:
        text = storage.read_text(uri, options).strip()
    except FileNotFoundError:
        return None
    try:
        return _check_version(text)
    except ValueError as exc:
        raise ValueError(f"{uri}: does not name a valid version ({exc})") from None


def list_product_lines(models_uri: str, options: StorageOptions | None = None) -> list[str]:
    """Product lines (sub-folders) of the registry, sorted; [] when the registry is empty."""
    fs, path = storage.get_fs(models_uri, options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = []
    for entry in entries:
        if entry.get("type") != "directory":
            continue
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("."):
            continue
        try:
            names.append(storage.safe_component(name))
        except ValueError:
            continue
    return sorted(names)


def list_versions(
    models_uri: str, product_line: str, options: StorageOptions | None = None
) -> list[str]:
    """Complete versions (model.json present) of a product line, oldest first.

    One recursive listing, so it costs the same on S3 however many versions exist.
    """
    line_uri = storage.canonical_uri(_line_uri(models_uri, product_line), options)
    try:
        files = storage.list_files(line_uri, options=options)
    except FileNotFoundError:
        return []
    versions = set()
    for uri in files:
        parts = uri[len(line_uri.rstrip("/")) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == CONFIG_FILE and not parts[0].startswith("."):
            versions.add(parts[0])
    return sorted(versions)


def _verify_dir(directory: Path) -> ModelMetadata:
    """model.json parses and every file it lists has the recorded sha256 (ArtifactError if not)."""
    meta = read_model_metadata(directory)
    for name, expected in meta.files.items():
        path = directory / storage.safe_component(name, "artifact file")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {CONFIG_FILE})")
        if sha256_file(path) != expected:
            raise ArtifactError(f"{path}: sha256 mismatch with {CONFIG_FILE}")
    return meta


def _artifact_files(directory: Path) -> list[Path]:
    files = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
    for path in files:
        if not path.is_file():
            raise ArtifactError(f"{path}: model directories hold files only")
        storage.safe_component(path.name, "artifact file")
    return files


def _fsync_tree(directory: Path) -> None:
    """Flush the files and the directory entry, so a rename after this is durable."""
    for path in directory.iterdir():
        with open(path, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A temp version directory older than this is debris whatever its name says.
STALE_TMP_S = 24 * 3600.0


def _sweep_stale_tmp(line_dir: Path) -> None:
    """Remove temp version directories of publishers that were killed mid-copy.

    Their names say who wrote them (``.tmp-{version}@{pid}@{host}``): one of this host whose
    process is gone is debris at once (a kill, then a rerun), any older than STALE_TMP_S is
    debris too (another host, or an older naming). A live publisher's directory is kept.
    """
    try:
        entries = list(line_dir.iterdir())
    except FileNotFoundError:
        return
    host = socket.gethostname()
    for entry in entries:
        if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            # A LATEST write killed between its temp file and the rename (a microsecond window;
            # a minute of age keeps a concurrent publisher's in-flight temp file).
            try:
                if time.time() - entry.stat().st_mtime > 60:
                    entry.unlink()
            except FileNotFoundError:
                pass
            continue
        if not entry.name.startswith(TMP_PREFIX):
            continue
        parts = entry.name.split("@")
        try:
            old = time.time() - entry.stat().st_mtime > STALE_TMP_S
        except FileNotFoundError:
            continue
        dead = len(parts) == 3 and parts[2] == host and not process_alive(int(parts[1]), None)
        if dead or old:
            shutil.rmtree(entry, ignore_errors=True)


def _publish_local(source: Path, line_dir: Path, version: str) -> None:
    final = line_dir / version
    if final.exists():
        raise FileExistsError(f"model version {final} already exists (versions are immutable)")
    line_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(line_dir)
    tmp = line_dir / f"{TMP_PREFIX}{version}@{os.getpid()}@{socket.gethostname()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crashed attempt with this name
        tmp.mkdir()
        for path in _artifact_files(source):
            shutil.copyfile(path, tmp / path.name)
        _fsync_tree(tmp)
        os.rename(tmp, final)  # fails (ENOTEMPTY) if the version appeared meanwhile
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _upload_file(path: Path, uri: str, options: StorageOptions | None) -> None:
    """One object PUT (atomic on S3). Module-level so tests can inject a crash between files."""
    storage.write_bytes_atomic(uri, path.read_bytes(), options)


def _discard_partial(uri: str, options: StorageOptions | None) -> None:
    """Best-effort removal of a failed upload (readers already ignore it: no model.json)."""
    try:
        storage.remove_tree(uri, options)
    except Exception as exc:  # cleanup must not hide the upload error
        logger.warning("could not remove partial model %s: %s", uri, storage.redact(str(exc)))


def _publish_remote(source: Path, target: str, options: StorageOptions | None) -> None:
    if storage.exists(storage.join_uri(target, CONFIG_FILE), options):
        raise FileExistsError(f"model version {target} already exists (versions are immutable)")
    files = _artifact_files(source)
    ordered = [p for p in files if p.name != CONFIG_FILE] + [
        p for p in files if p.name == CONFIG_FILE
    ]
    try:
        for path in ordered:
            _upload_file(path, storage.join_uri(target, path.name), options)
    except BaseException:
        _discard_partial(target, options)
        raise


def publish(
    local_model_dir: str | os.PathLike[str],
    models_uri: str,
    product_line: str,
    options: StorageOptions | None = None,
    version: str | None = None,
    promote: bool = True,
) -> str:
    """Upload a saved model as a new immutable version, then point LATEST at it.

    The local directory is verified first (checksums in model.json), so a corrupt artifact is
    never published. ``promote=False`` publishes without moving LATEST (the promotion gate held
    it back; pipeline.promotion). Returns the version name.
    """
    source = Path(local_model_dir)
    _verify_dir(source)
    version = _check_version(version or new_version())
    line_uri = _line_uri(models_uri, product_line)
    target = version_uri(models_uri, product_line, version)
    if _is_local(models_uri, options):
        _publish_local(source, Path(storage.get_fs(line_uri)[1]), version)
    else:
        _publish_remote(source, target, options)
    if promote:
        storage.write_text_atomic(storage.join_uri(line_uri, LATEST), version + "\n", options)
    return version


def set_latest(
    models_uri: str, product_line: str, version: str, options: StorageOptions | None = None
) -> None:
    """Point LATEST at an existing complete version (``models promote``)."""
    uri = storage.join_uri(version_uri(models_uri, product_line, version), CONFIG_FILE)
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"model {product_line}/{version} not found under {models_uri}")
    line_uri = _line_uri(models_uri, product_line)
    storage.write_text_atomic(storage.join_uri(line_uri, LATEST), version + "\n", options)


def read_version_metadata(
    models_uri: str, product_line: str, version: str, options: StorageOptions | None = None
) -> dict[str, Any]:
    """model.json of a published version, without downloading the weights."""
    uri = storage.join_uri(version_uri(models_uri, product_line, version), CONFIG_FILE)
    try:
        return json.loads(storage.read_text(uri, options))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{uri}: not valid JSON ({exc})") from None


def _cached_ok(directory: Path) -> bool:
    try:
        _verify_dir(directory)
    except (ArtifactError, OSError):
        return False
    return True


def fetch(
    models_uri: str,
    product_line: str,
    version: str,
    cache_dir: str | os.PathLike[str],
    options: StorageOptions | None = None,
) -> Path:
    """Download a version to ``cache_dir/{line}/{version}/`` (verified) and return that path.

    A cached copy whose files match the checksums in its model.json is reused, so every
    scoring worker on a node downloads a model once. Downloads go to a temporary directory
    that is renamed into place, so a concurrent reader never sees a partial copy.
    """
    remote = storage.canonical_uri(version_uri(models_uri, product_line, version), options)
    target = Path(cache_dir).expanduser().resolve() / product_line / version
    if _cached_ok(target):
        return target
    if not storage.exists(storage.join_uri(remote, CONFIG_FILE), options):
        raise FileNotFoundError(
            f"model {product_line}/{version} not found (or incomplete) under {models_uri}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        for uri in storage.list_files(remote, options=options):
            parts = uri[len(remote.rstrip("/")) + 1 :].split("/")
            if len(parts) != 1:
                continue  # artifacts are flat; ignore anything nested
            name = storage.safe_component(parts[0], "artifact file")
            (tmp / name).write_bytes(storage.read_bytes(uri, options))
        _verify_dir(tmp)
        if target.exists():  # a stale or corrupt cached copy
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _cached_ok(target):  # lost a race to a writer whose copy is bad: unusual
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_weights(
    uri: str | None, cache_dir: str | os.PathLike[str], options: StorageOptions | None = None
) -> str | None:
    """Local path of the backbone weights a model was trained with (``uri``: its
    ModelMetadata.weights_uri), or None for the default.

    None means the model used the backbone registry's offline weights, which build_extractor
    finds by itself; the sha256 recorded in model.json is checked when the model is loaded.
    """
    if not uri:
        return None
    return str(storage.copy_to_local(uri, cache_dir, options))


def describe(models_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """One summary per complete version of every product line (for ``models list``).

    A version whose model.json this library cannot read (a newer format, a hand-edited file)
    is still listed, with only its name: one odd version must not hide the others.
    """
    rows = []
    for line in list_product_lines(models_uri, options):
        latest = latest_version(models_uri, line, options)
        for version in list_versions(models_uri, line, options):
            uri = storage.join_uri(version_uri(models_uri, line, version), CONFIG_FILE)
            raw = read_version_metadata(models_uri, line, version, options)
            try:
                meta: ModelMetadata | None = parse_metadata(raw, uri)
            except ArtifactError:
                meta = None
            rows.append({"product_line": line, "version": version, "latest": version == latest,
                         **_summary(meta)})  # fmt: skip
    return rows


def _summary(meta: ModelMetadata | None) -> dict[str, Any]:
    calibration = meta.calibration if meta else None
    return {
        "created_at": meta.created_at if meta else None,
        "backbone": meta.backbone.name if meta else None,
        "image_size": meta.model_config.image_size if meta else None,
        "train_images": meta.train_image_count if meta else None,
        "latent_dim": meta.latent_dim if meta else None,
        "image_threshold": calibration.image_threshold if calibration else None,
        "pixel_threshold": calibration.pixel_threshold if calibration else None,
        "metrics": meta.metrics.fields if meta else {},
    }
