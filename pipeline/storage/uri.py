"""URI parsing and path safety: which backend a URI names, and keys data cannot escape.

Object keys built from data (product lines, image ids) go through :func:`safe_component` so a
crafted id cannot escape the output prefix (``..``, ``/``, ``%2F``, backslashes, ...). Relative
entries of list files, listings, manifests and feedback tables follow one rule,
:func:`resolve_relative`.
"""

from __future__ import annotations

import os
import posixpath
import re

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_LOCAL_SCHEMES = ("", "file", "local")
_S3_SCHEMES = ("s3",)

_SAFE_COMPONENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_COMPONENT_LEN = 200


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


def is_absolute_uri(entry: str) -> bool:
    """A URI with a scheme, or an absolute local path (``~`` meaning the home folder)."""
    return "://" in entry or os.path.isabs(os.path.expanduser(entry))


def folder_of(uri: str) -> str:
    """The folder a file lies in: what its relative entries are relative to (a local folder is
    made absolute, so the result does not depend on a worker's working directory)."""
    if "://" in uri:
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))


def resolve_relative(entry: str, folder: str, what: str = "relative path") -> str:
    """THE relative-URI rule: an absolute entry stays as it is; a relative one names a file
    below ``folder`` (a list file's, listing's, manifest's or feedback table's own folder).

    ``\\`` counts as a separator, empty and ``.`` components are dropped, and ``..`` is a
    ValueError (named ``what``) rather than a way out of that folder: a table that someone
    else wrote must not make a job read elsewhere than where the table lies.
    """
    if is_absolute_uri(entry):
        return entry
    parts = [p for p in entry.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(
            f"unsafe {what} {entry!r}: relative path references ('..') are not allowed"
        )
    if not parts:
        return folder
    return folder.rstrip("/") + "/" + "/".join(parts)


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
