"""Filesystem factory: fsspec and pyarrow filesystems for a URI, with the backend's options.

Filesystem objects are never shipped between processes. Ray workers call :func:`get_fs` /
:func:`pyarrow_fs` themselves with the same (frozen, picklable) :class:`StorageOptions`, and
the per-process cache below makes that cheap. The cache key includes the PID so a forked child
never reuses a parent's aiobotocore session or event loop. Credentials are never taken as
arguments and never stored on our objects: botocore / the AWS C++ SDK resolve them from the
standard ``AWS_*`` environment variables and config files.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem

from pipeline.storage.redaction import redact
from pipeline.storage.uri import _split, is_absolute_uri, resolve_relative

#: Retry policy for every S3 client. Adaptive mode adds client-side rate limiting, which is what
#: many concurrent Ray workers hitting one prefix need when S3 starts answering SlowDown.
S3_RETRY_CONFIG: dict[str, object] = {"max_attempts": 10, "mode": "adaptive"}
_S3_MAX_ATTEMPTS = 10
_DEFAULT_REGION = "us-east-1"


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


def _make_pa_s3(
    options: StorageOptions, region: str, attempts: int = _S3_MAX_ATTEMPTS
) -> pafs.FileSystem:
    kwargs: dict[str, object] = {
        "anonymous": options.anon,
        "region": region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
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


class StorageUnreachable(OSError):
    """The S3 endpoint serving a URI did not answer (connection refused, unknown host, timeout)."""


def check_reachable(
    uri: str, options: StorageOptions | None = None, attempts: int | None = None
) -> None:
    """Raise :class:`StorageUnreachable` when the S3 endpoint serving ``uri`` cannot be reached.

    One HEAD of the object, under the reads' own retry policy (``attempts``: by default theirs),
    so it fails only where each read would. Why: with the endpoint down, every read retries for
    80-100 s before its row becomes a ``read_error``, so a night's job would run for hours or
    days and then commit a run of error rows, which a rerun finds "already committed". A
    missing object or a denied request means the store answered: nothing to report here (those
    rows say so). Local paths have nothing to reach.
    """
    protocol, path = _split(uri)
    if protocol == "file":
        return
    opts = _resolve(options)
    try:
        fs = _make_pa_s3(opts, _region_from_env(), attempts or _S3_MAX_ATTEMPTS)
        fs.get_file_info(path)
    except OSError as exc:
        # the AWS SDK's type for every transport failure (curl: refused, DNS, timeout)
        if "NETWORK_CONNECTION" not in str(exc):
            return
        endpoint = _strip_userinfo(opts.s3_endpoint_url or "") or (
            "AWS S3 (no --s3-endpoint-url or DFR_S3_ENDPOINT_URL set)"
        )
        raise StorageUnreachable(redact(f"cannot reach {endpoint} to read {uri}: {exc}")) from None


def client_failure(exc: BaseException) -> str | None:
    """What went wrong, when ``exc`` is botocore's own error (s3fs); None for anything else.

    botocore raises missing credentials, an endpoint that does not answer and timeouts as its
    own exceptions, not OSErrors, so handlers written for storage failures miss them and a
    traceback reached the user (``train`` and ``models list`` against a down endpoint). The
    message names the request's URL where botocore gives one, and says where credentials come
    from when they are missing.
    """
    if "botocore.exceptions" not in sys.modules:  # nothing raised it; import nothing
        return None
    from botocore.exceptions import BotoCoreError, NoCredentialsError, PartialCredentialsError

    if not isinstance(exc, BotoCoreError):
        return None
    hint = ""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        hint = " (S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile"
        hint += " in ~/.aws, or the machine's role; DFR_S3_ANON=1 for a public bucket)"
    return redact(f"S3 storage: {type(exc).__name__}: {exc}{hint}")


def cell_uri(value: str, base_dir: str | None, options: StorageOptions | None, source: str) -> str:
    """An absolute, supported URI for a table cell (a manifest's, a feedback table's).

    A relative path follows the one relative-URI rule (uri.resolve_relative) against the
    table's folder, ``base_dir``; a remote table (``base_dir`` None) has no folder a worker
    could read relative paths from, so there it is an error. Unsupported schemes and
    bucket-less S3 URIs are refused here too (get_fs).
    """
    if not is_absolute_uri(value):
        if base_dir is None:
            raise ValueError(f"relative path {value!r} in a remote {source}: use an absolute URI")
        value = resolve_relative(value, base_dir)
    get_fs(value, options)
    return value


def canonical_uri(uri: str, options: StorageOptions | None = None) -> str:
    """The form storage.list_files returns: an absolute local path, or ``s3://bucket/key``.

    Lets callers compare listed URIs with URIs they build from a user's input, whatever
    spelling (``file://``, relative path, trailing slash) the user chose.
    """
    fs, path = get_fs(uri, options)
    return path if isinstance(fs, LocalFileSystem) else f"s3://{path}"
