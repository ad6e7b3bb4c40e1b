"""Reads and writes through any backend, including the project's one atomic writer and the
conditional create that run leases are built on."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import secrets
import shutil

from pipeline.storage.filesystems import StorageOptions, get_fs
from pipeline.storage.uri import _split, _to_uri, safe_component


def read_bytes(uri: str, options: StorageOptions | None = None) -> bytes:
    """Read a whole object; a missing object raises :class:`FileNotFoundError`."""
    fs, path = get_fs(uri, options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def read_text(uri: str, options: StorageOptions | None = None) -> str:
    """UTF-8 wrapper around :func:`read_bytes`."""
    return read_bytes(uri, options).decode("utf-8")


def _temp_path(path: str, staging_dir: str | None) -> str:
    """A unique hidden temp name for ``path``: in ``staging_dir`` when given, else beside it."""
    directory = staging_dir or os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")


def _write_temp(tmp: str, data: bytes) -> None:
    """Create ``tmp`` exclusively and flush ``data`` to disk. Created with ``os.open(...,
    0o666)`` (not ``mkstemp``'s 0600) so the final file gets the usual umask permissions."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_local_atomic(path: str, data: bytes, staging_dir: str | None = None) -> None:
    """Write via a temp file + ``os.replace`` so readers never see partial data.

    The temp file lives in ``staging_dir`` when given (a run-scoped directory that readers never
    look at and that the committing run deletes, so a process killed mid-write leaves nothing
    in the output tree), else beside the target. A staging directory on another filesystem
    (EXDEV) falls back to the same-directory temp.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = _temp_path(path, staging_dir)
    try:
        _write_temp(tmp, data)
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno == errno.EXDEV and staging_dir is not None:
            _write_local_atomic(path, data, None)
            return
        raise
    except BaseException:
        _unlink_quietly(tmp)
        raise


def write_bytes_atomic(
    uri: str, data: bytes, options: StorageOptions | None = None, staging: str | None = None
) -> None:
    """Write ``data`` so that readers see either the old object or the complete new one.

    The one atomic writer of the project. Locally that needs temp file + rename (the temp goes
    to ``staging``, a local directory URI, when given); on S3 a PUT (or completed multipart
    upload) is already atomic, so the object is written directly and ``staging`` is unused.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        staging_dir = None
        if staging is not None:
            staging_protocol, staging_dir = _split(staging)
            if staging_protocol != "file":
                staging_dir = None
        _write_local_atomic(path, bytes(data), staging_dir)
        return
    fs, path = get_fs(uri, options)
    fs.pipe_file(path, bytes(data))


def write_text_atomic(
    uri: str, text: str, options: StorageOptions | None = None, staging: str | None = None
) -> None:
    """UTF-8 wrapper around :func:`write_bytes_atomic`."""
    write_bytes_atomic(uri, text.encode("utf-8"), options, staging)


def _is_precondition_failure(exc: OSError) -> bool:
    text = str(exc)
    return "PreconditionFailed" in text or "Precondition Failed" in text or "412" in text


def create_exclusive(uri: str, data: bytes, options: StorageOptions | None = None) -> bool:
    """Create ``uri`` with ``data`` only if it does not exist; False when it already does.

    The conditional create that leases are built on: locally a complete temp file is
    hard-linked into place (``link`` fails if the name exists, and readers never see a partial
    file); on S3 a PUT with ``If-None-Match: *`` (AWS S3 and the moto test server honour it;
    412 Precondition Failed when the key exists).
    """
    protocol, path = _split(uri)
    if protocol == "file":
        tmp = _temp_path(path, None)
        try:
            _write_temp(tmp, bytes(data))
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            _unlink_quietly(tmp)
        return True
    fs, path = get_fs(uri, options)
    try:
        fs.pipe_file(path, bytes(data), mode="create")
    except FileExistsError:
        return False
    except OSError as exc:
        if _is_precondition_failure(exc):
            return False
        raise
    return True


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """True if ``uri`` is an existing file/object or a non-empty prefix/directory."""
    fs, path = get_fs(uri, options)
    return bool(fs.exists(path))


def list_files(
    uri: str,
    suffixes: tuple[str, ...] | None = None,
    options: StorageOptions | None = None,
) -> list[str]:
    """Recursively list files under ``uri`` as full URIs, sorted.

    S3 results keep the ``s3://`` scheme; local results are absolute paths. ``suffixes`` is
    matched case-insensitively (``.PNG`` matches ``.png``). A missing prefix raises
    :class:`FileNotFoundError` naming the URI, because an empty result from a typo'd input
    prefix would otherwise look like a successful run over zero images.
    """
    protocol, _ = _split(uri)
    fs, path = get_fs(uri, options)
    if not fs.exists(path):
        raise FileNotFoundError(f"no such file or prefix: {uri}")
    found = fs.find(path, withdirs=False)
    wanted = None if suffixes is None else tuple(s.lower() for s in suffixes)
    out = []
    for item in found:
        item = item.rstrip("/") if protocol == "s3" else item
        if wanted is not None and not item.lower().endswith(wanted):
            continue
        out.append(_to_uri(protocol, item))
    return sorted(out)


def makedirs(uri: str, options: StorageOptions | None = None) -> None:
    """Create a local directory (and parents); a no-op on S3, where prefixes are implicit."""
    protocol, path = _split(uri)
    if protocol == "file":
        os.makedirs(path, exist_ok=True)


def remove_tree(uri: str, options: StorageOptions | None = None) -> None:
    """Delete everything under ``uri``; missing is fine (idempotent cleanup).

    Refuses the local root and whole buckets: deleting those is never what a pipeline stage
    means, and s3fs would try to delete the bucket itself.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        if path == os.path.sep:
            raise ValueError("refusing to remove the filesystem root")
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.unlink(path)
        return
    if "/" not in path:
        raise ValueError(f"refusing to remove a whole bucket: s3://{path}")
    fs, path = get_fs(uri, options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_empty_dir(uri: str) -> None:
    """Remove a local directory if it is empty (tidy up after :func:`remove_tree` of its last
    child); anything else, or S3 (no directories), is left alone."""
    protocol, path = _split(uri)
    if protocol == "file":
        try:
            os.rmdir(path)
        except OSError:
            pass


def copy_to_local(
    uri: str, local_dir: str | os.PathLike[str], options: StorageOptions | None = None
) -> pathlib.Path:
    """Make a remote file (e.g. model weights on S3) available as a local path.

    Local inputs are returned as-is (absolute). Remote files land in
    ``local_dir/<hash of uri>/<name>``, the hash keeping same-named files from different
    buckets apart; a cached copy whose size matches the object is reused so many workers on a
    node download once. Downloads go to a temp name first so a crash leaves no truncated file.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        local = pathlib.Path(path)
        if not local.is_file():
            raise FileNotFoundError(f"no such file: {uri}")
        return local
    fs, path = get_fs(uri, options)
    name = path.rsplit("/", 1)[-1]
    try:
        safe_component(name)
    except ValueError:
        name = "object"
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    target_dir = pathlib.Path(local_dir).expanduser().resolve() / digest
    target = target_dir / name
    size = fs.size(path)  # raises FileNotFoundError for a missing object
    if target.is_file() and target.stat().st_size == size:
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target_dir / f".{name}.{secrets.token_hex(6)}.tmp"
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
