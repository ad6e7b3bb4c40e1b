"""URI-addressed storage for the pipeline: local paths, ``file://`` and ``s3://`` alike.

Every stage reads and writes through this module so that the same job config runs against a
laptop directory, AWS S3, or an S3-compatible store (MinIO, Ceph, moto in tests) by changing
only a URI and, for non-AWS stores, an endpoint URL.

Design notes (the "why"):

* Filesystem objects are never shipped between processes. Ray workers call :func:`get_fs` /
  :func:`pyarrow_fs` themselves with the same (frozen, picklable) :class:`StorageOptions`, and
  the per-process cache below makes that cheap. The cache key includes the PID so a forked
  child never reuses a parent's aiobotocore session or event loop.
* Credentials are never taken as arguments and never stored on our objects: botocore / the AWS
  C++ SDK resolve them from the standard ``AWS_*`` environment variables and config files.
  :func:`redact` scrubs them from any text that could reach a log or an error row.
* Object keys built from data (product lines, image ids) go through :func:`safe_component` so a
  crafted id cannot escape the output prefix (``..``, ``/``, ``%2F``, backslashes, ...).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import re
import secrets
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "IMAGE_SUFFIXES",
    "StorageOptions",
    "copy_to_local",
    "create_exclusive",
    "exists",
    "get_fs",
    "join_uri",
    "list_files",
    "makedirs",
    "pyarrow_fs",
    "read_bytes",
    "read_text",
    "redact",
    "remove_empty_dir",
    "remove_tree",
    "safe_component",
    "write_bytes_atomic",
    "write_text_atomic",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

#: Retry policy for every S3 client. Adaptive mode adds client-side rate limiting, which is what
#: many concurrent Ray workers hitting one prefix need when S3 starts answering SlowDown.
S3_RETRY_CONFIG: dict[str, object] = {"max_attempts": 10, "mode": "adaptive"}
_S3_MAX_ATTEMPTS = 10
_DEFAULT_REGION = "us-east-1"

_LOCAL_SCHEMES = ("", "file", "local")
_S3_SCHEMES = ("s3",)

_SAFE_COMPONENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_COMPONENT_LEN = 200


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def _strip_userinfo(url: str) -> str:
    """Drop ``user:password@`` from a URL so an endpoint can be shown without leaking secrets."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


@dataclass(frozen=True)
class StorageOptions:
    """Non-secret settings that select and configure the storage backend.

    Frozen and made only of plain values so it is hashable (a cache key) and pickles cleanly
    into Ray tasks. Credentials deliberately have no field here: they come from the standard
    AWS environment/config chain in whichever process opens the filesystem.
    """

    #: Explicit endpoint for S3-compatible stores (``http://127.0.0.1:9000``). ``None`` means
    #: "whatever botocore resolves", which also honours ``AWS_ENDPOINT_URL``.
    s3_endpoint_url: str | None = None
    #: Unsigned requests, for public buckets.
    anon: bool = False

    @classmethod
    def from_env(cls) -> StorageOptions:
        """Build options from the environment, so Ray workers and CLI runs agree by default.

        ``DFR_S3_ENDPOINT_URL`` wins (it is ours and cannot surprise other AWS tooling), then
        the standard ``AWS_ENDPOINT_URL_S3`` and ``AWS_ENDPOINT_URL``. ``DFR_S3_ANON=1`` enables
        anonymous access.
        """
        endpoint = None
        for var in ("DFR_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            value = os.environ.get(var, "").strip()
            if value:
                endpoint = value
                break
        anon = os.environ.get("DFR_S3_ANON", "").strip().lower() in ("1", "true", "yes")
        return cls(s3_endpoint_url=endpoint, anon=anon)

    def __repr__(self) -> str:
        endpoint = None if self.s3_endpoint_url is None else _strip_userinfo(self.s3_endpoint_url)
        return f"StorageOptions(s3_endpoint_url={endpoint!r}, anon={self.anon!r})"


def _resolve(options: StorageOptions | None) -> StorageOptions:
    """``None`` means "from the environment" so callers (and Ray workers) need not thread it."""
    return StorageOptions.from_env() if options is None else options


# --------------------------------------------------------------------------------------------
# URI parsing
# --------------------------------------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    """Return ``(protocol, path)`` where protocol is ``"file"`` or ``"s3"``.

    Local paths come back absolute so results do not depend on a worker's working directory.
    Unknown schemes are rejected rather than guessed, to keep fsspec and pyarrow in agreement.
    """
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"invalid storage URI {uri!r}")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return "file", os.path.abspath(os.path.expanduser(uri))
    scheme = scheme.lower()
    if scheme in _LOCAL_SCHEMES:
        # file:///abs/path -> /abs/path ; file://relative is treated as relative to the CWD.
        return "file", os.path.abspath(os.path.expanduser(rest))
    if scheme in _S3_SCHEMES:
        path = rest.strip("/")
        if not path:
            raise ValueError(f"S3 URI {uri!r} has no bucket")
        return "s3", path
    raise ValueError(f"unsupported URI scheme {scheme!r} in {uri!r} (use s3://, file:// or a path)")


def _to_uri(protocol: str, path: str) -> str:
    """Inverse of :func:`_split` (local paths are returned as plain absolute paths)."""
    return f"s3://{path}" if protocol == "s3" else path


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_FS_CACHE: dict[tuple[object, ...], Any] = {}
_FS_LOCK = threading.Lock()


def _cached(key: tuple[object, ...], factory: Callable[[], _T]) -> _T:
    """Per-process memo: the PID in the key keeps forked children from sharing clients."""
    full_key = (os.getpid(), *key)
    with _FS_LOCK:
        fs = _FS_CACHE.get(full_key)
        if fs is None:
            fs = factory()
            _FS_CACHE[full_key] = fs
        return fs


def _make_s3fs(options: StorageOptions) -> fsspec.AbstractFileSystem:
    import s3fs  # imported lazily: purely local runs should not pay for aiobotocore

    return s3fs.S3FileSystem(
        anon=options.anon,
        endpoint_url=options.s3_endpoint_url,
        config_kwargs={"retries": dict(S3_RETRY_CONFIG)},
        # Other processes (Ray workers) write to the same prefixes; a listings cache would make
        # list_files/exists return stale answers in the driver.
        use_listings_cache=False,
        # Our own cache above is authoritative; fsspec's instance cache would key on the same
        # arguments anyway.
        skip_instance_cache=True,
    )


def get_fs(
    uri: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fsspec filesystem, path without scheme)`` for ``uri``.

    Local paths and ``file://`` give a :class:`LocalFileSystem` and an absolute path; ``s3://``
    gives an :class:`s3fs.S3FileSystem` (``bucket/key`` path) configured with the endpoint and
    retry policy. Instances are cached per process and per ``(protocol, options)``; call this in
    the process that uses the filesystem instead of pickling the returned object.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        return _cached(("fsspec", "file"), LocalFileSystem), path
    opts = _resolve(options)
    return _cached(("fsspec", "s3", opts), lambda: _make_s3fs(opts)), path


def _region_from_env() -> str:
    return (
        os.environ.get("AWS_REGION", "").strip()
        or os.environ.get("AWS_DEFAULT_REGION", "").strip()
        or _DEFAULT_REGION
    )


def _make_pa_s3(options: StorageOptions, region: str) -> pafs.FileSystem:
    kwargs: dict[str, object] = {
        "anonymous": options.anon,
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_MAX_ATTEMPTS),
    }
    if options.s3_endpoint_url:
        parts = urlsplit(options.s3_endpoint_url)
        if not parts.scheme or not parts.netloc:
            raise ValueError(
                "S3 endpoint URL must look like http(s)://host[:port], got "
                f"{_strip_userinfo(options.s3_endpoint_url)!r}"
            )
        # pyarrow wants host[:port] and the scheme separately (unlike botocore's full URL).
        kwargs["endpoint_override"] = parts.netloc.rsplit("@", 1)[-1] + parts.path.rstrip("/")
        kwargs["scheme"] = parts.scheme
    return pafs.S3FileSystem(**kwargs)


def pyarrow_fs(uri: str, options: StorageOptions | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(pyarrow filesystem, path without scheme)`` for Parquet and Ray Data I/O.

    Native ``pyarrow.fs.S3FileSystem`` (not an fsspec wrapper) so Arrow's multi-threaded readers
    and writers stay in C++. Region comes from ``AWS_REGION``/``AWS_DEFAULT_REGION`` or
    ``us-east-1``; credentials from the standard AWS chain.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        return _cached(("pyarrow", "file"), pafs.LocalFileSystem), path
    opts = _resolve(options)
    region = _region_from_env()
    return _cached(("pyarrow", "s3", opts, region), lambda: _make_pa_s3(opts, region)), path


# --------------------------------------------------------------------------------------------
# Path safety
# --------------------------------------------------------------------------------------------


def canonical_uri(uri: str, options: StorageOptions | None = None) -> str:
    """The form storage.list_files returns: an absolute local path, or ``s3://bucket/key``.

    Lets callers compare listed URIs with URIs they build from a user's input, whatever
    spelling (``file://``, relative path, trailing slash) the user chose.
    """
    fs, path = get_fs(uri, options)
    return path if isinstance(fs, LocalFileSystem) else f"s3://{path}"


def safe_component(name: str, what: str = "name") -> str:
    """Validate ``name`` as a single path component and return it unchanged.

    Product lines and image ids come from file names and manifests, i.e. from data; using them
    in output keys unchecked would allow path traversal (``..``, ``a/b``, ``/abs``, ``a\\b``) or
    keys that decode into separators (``a%2Fb``). Only ``[A-Za-z0-9._-]``, 1-200 characters,
    and never ``.`` or ``..``.
    """
    if not isinstance(name, str):
        raise ValueError(f"unsafe {what} {name!r}: must be a string")
    if not name:
        raise ValueError(f"unsafe {what} {name!r}: must not be empty")
    if name in (".", ".."):
        raise ValueError(f"unsafe {what} {name!r}: relative path references are not allowed")
    if len(name) > _MAX_COMPONENT_LEN:
        raise ValueError(f"unsafe {what} {name!r}: longer than {_MAX_COMPONENT_LEN} characters")
    if not _SAFE_COMPONENT_RE.fullmatch(name):
        raise ValueError(f"unsafe {what} {name!r}: only letters, digits, '.', '_' and '-' allowed")
    return name


def join_uri(base: str, *parts: str) -> str:
    """Join ``parts`` onto ``base`` with ``/``, keeping the base's scheme untouched.

    ``base`` is trusted (it comes from configuration); every part is validated with
    :func:`safe_component` and must be exactly one path component, so a data-derived id can
    never add directories or climb out of ``base``. Pass nested constants as separate parts:
    ``join_uri(out, "masks", line, f"{image_id}.png")``.
    """
    if not base:
        raise ValueError("join_uri needs a non-empty base")
    for part in parts:
        safe_component(part, "path component")
    if not parts:
        return base
    stripped = base.rstrip("/")
    if not stripped or stripped.endswith(":/") or stripped.endswith(":"):
        # "/" or "file:///" -> keep the root separator(s) that rstrip removed.
        stripped = base if base.endswith("/") else base + "/"
        return stripped + "/".join(parts)
    return stripped + "/" + "/".join(parts)


# --------------------------------------------------------------------------------------------
# Reads and writes
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------

_SECRET_ENV_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN")
_REDACTED = "***"
# key=value / key: value / "key": "value" forms of credential settings, any case.
_SECRET_ASSIGN_RE = re.compile(
    r"""(?ix)
    (?P<key>["']?(?:aws_)?(?:secret_access_key|access_key_id|session_token|secret_key|
        security_token)["']?)
    (?P<sep>\s*[=:]\s*)
    (?P<value>["']?)[^\s"',;&}]+(?P=value)
    """
)
# Presigned-URL query parameters that embed a signature or credential scope.
_SIGNED_PARAM_RE = re.compile(
    r"(?i)(?P<key>X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s\"']+"
)
# Long-term (AKIA) and temporary (ASIA) access key ids.
_ACCESS_KEY_ID_RE = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")


def redact(text: str) -> str:
    """Remove AWS credentials from ``text`` before it reaches a log line or an error row.

    Scrubs the values of ``AWS_SECRET_ACCESS_KEY``, ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SESSION_TOKEN`` currently in the environment, ``aws_secret_access_key=...``-style
    assignments, presigned-URL signatures and anything shaped like an access key id.
    """
    if not isinstance(text, str):
        text = str(text)
    # Longest first so a value that contains another is not left half-replaced.
    values = sorted(
        {os.environ.get(var, "") for var in _SECRET_ENV_VARS} - {""}, key=len, reverse=True
    )
    for value in values:
        if len(value) >= 4:  # avoid mangling text when a test sets a trivially short value
            text = text.replace(value, _REDACTED)
    text = _SECRET_ASSIGN_RE.sub(
        lambda m: (
            f"{m.group('key')}{m.group('sep')}{m.group('value')}{_REDACTED}{m.group('value')}"
        ),
        text,
    )
    text = _SIGNED_PARAM_RE.sub(lambda m: m.group("key") + _REDACTED, text)
    return _ACCESS_KEY_ID_RE.sub(_REDACTED, text)
