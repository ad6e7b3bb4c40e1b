"""URI-addressed storage for the pipeline: local paths, ``file://`` and ``s3://`` alike.

Every stage reads and writes through this package so that the same job config runs against a
laptop directory, AWS S3, or an S3-compatible store (MinIO, Ceph, moto in tests) by changing
only a URI and, for non-AWS stores, an endpoint URL. Callers use the names re-exported here
(``from pipeline import storage; storage.read_bytes(...)``); the modules split the concerns:

* :mod:`~pipeline.storage.uri`: URI parsing and path safety (:func:`safe_component`,
  :func:`join_uri`), so a crafted id cannot escape the output prefix.
* :mod:`~pipeline.storage.filesystems`: :class:`StorageOptions` and the per-process cached
  fsspec / pyarrow filesystems. Filesystem objects are never shipped between processes, and
  credentials are never taken as arguments: botocore / the AWS C++ SDK resolve them from the
  standard ``AWS_*`` environment variables and config files.
* :mod:`~pipeline.storage.io`: reads, the one atomic writer, ``create_exclusive``, listing and
  removal.
* :mod:`~pipeline.storage.redaction`: :func:`redact` scrubs credentials from any text that
  could reach a log or an error row.

A test that monkeypatches a function here patches what callers of ``storage.X`` see, not the
calls between the modules (``read_text`` calls :func:`pipeline.storage.io.read_bytes`).
"""

from __future__ import annotations

from pipeline.storage.filesystems import (
    S3_RETRY_CONFIG,
    StorageOptions,
    StorageUnreachable,
    canonical_uri,
    cell_uri,
    check_reachable,
    client_failure,
    get_fs,
    pyarrow_fs,
)
from pipeline.storage.io import (
    copy_to_local,
    create_exclusive,
    exists,
    list_files,
    makedirs,
    read_bytes,
    read_text,
    remove_empty_dir,
    remove_tree,
    write_bytes_atomic,
    write_text_atomic,
)
from pipeline.storage.redaction import redact
from pipeline.storage.uri import (
    IMAGE_SUFFIXES,
    folder_of,
    is_absolute_uri,
    join_uri,
    resolve_relative,
    safe_component,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "S3_RETRY_CONFIG",
    "StorageOptions",
    "StorageUnreachable",
    "canonical_uri",
    "cell_uri",
    "check_reachable",
    "client_failure",
    "copy_to_local",
    "create_exclusive",
    "exists",
    "folder_of",
    "get_fs",
    "is_absolute_uri",
    "join_uri",
    "list_files",
    "makedirs",
    "pyarrow_fs",
    "read_bytes",
    "read_text",
    "redact",
    "remove_empty_dir",
    "remove_tree",
    "resolve_relative",
    "safe_component",
    "write_bytes_atomic",
    "write_text_atomic",
]
