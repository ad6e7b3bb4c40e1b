"""Integration tests for ``pipeline.storage`` against local disk, a moto S3 server and Ray.

The same behaviours are checked on both backends because the pipeline's promise is that a job
runs unchanged whether its URIs point at a directory or a bucket.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import (
    IMAGE_SUFFIXES,
    StorageOptions,
    copy_to_local,
    exists,
    get_fs,
    join_uri,
    list_files,
    makedirs,
    pyarrow_fs,
    read_bytes,
    read_text,
    redact,
    remove_tree,
    safe_component,
    write_bytes_atomic,
    write_text_atomic,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _populate(base: str) -> dict[str, bytes]:
    """Write a small nested tree with mixed suffixes/case; return {relative key: payload}."""
    files = {
        "a.png": b"png-a",
        "b.TXT": b"text",
        "sub/c.JPG": b"jpg-c",
        "sub/deeper/d.tiff": b"tiff-d",
        "sub/deeper/e.json": b"{}",
    }
    for rel, payload in files.items():
        write_bytes_atomic(join_uri(base, *rel.split("/")), payload)
    return files


def _check_round_trip(base: str, expect_prefix: str) -> None:
    files = _populate(base)
    for rel, payload in files.items():
        uri = join_uri(base, *rel.split("/"))
        assert exists(uri)
        assert read_bytes(uri) == payload

    all_files = list_files(base)
    assert all_files == sorted(join_uri(base, *rel.split("/")) for rel in files)
    assert all(f.startswith(expect_prefix) for f in all_files)

    images = list_files(base, suffixes=IMAGE_SUFFIXES)
    assert [f.rsplit("/", 1)[-1] for f in images] == ["a.png", "c.JPG", "d.tiff"]
    # Suffix filter given in upper case still matches case-insensitively.
    assert [f.rsplit("/", 1)[-1] for f in list_files(base, suffixes=(".TXT",))] == ["b.TXT"]

    # Overwrite is atomic-replace, text helpers are UTF-8.
    uri = join_uri(base, "note.txt")
    write_text_atomic(uri, "first")
    write_text_atomic(uri, "zweite Änderung")
    assert read_text(uri) == "zweite Änderung"

    assert not exists(join_uri(base, "nope.png"))
    with pytest.raises(FileNotFoundError):
        read_bytes(join_uri(base, "nope.png"))
    missing = join_uri(base, "missing-prefix")
    with pytest.raises(FileNotFoundError, match="missing-prefix"):
        list_files(missing)

    remove_tree(join_uri(base, "sub"))
    assert not exists(join_uri(base, "sub", "c.JPG"))
    assert [f.rsplit("/", 1)[-1] for f in list_files(base, IMAGE_SUFFIXES)] == ["a.png"]
    remove_tree(join_uri(base, "sub"))  # idempotent


# --------------------------------------------------------------------------------------------
# local backend (no server needed)
# --------------------------------------------------------------------------------------------


def test_local_round_trip(tmp_path: Path) -> None:
    base = str(tmp_path / "store")
    makedirs(base)
    _check_round_trip(base, expect_prefix=str(tmp_path))
    # No temp files are left behind by atomic writes.
    assert not [p for p in (tmp_path / "store").rglob("*.tmp")]


def test_local_file_scheme_and_relative_paths(tmp_path: Path, monkeypatch) -> None:
    write_bytes_atomic(f"file://{tmp_path}/x/y.png", b"1")
    assert list_files(f"file://{tmp_path}") == [str(tmp_path / "x" / "y.png")]
    monkeypatch.chdir(tmp_path)
    fs, path = get_fs("x/y.png")
    assert path == str(tmp_path / "x" / "y.png")
    assert fs.cat_file(path) == b"1"
    assert copy_to_local("x/y.png", tmp_path / "cache") == tmp_path / "x" / "y.png"


def test_local_atomic_write_keeps_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    write_bytes_atomic(str(target), b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_unsupported_scheme_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        get_fs("gopher://host/x")
    with pytest.raises(ValueError, match="no bucket"):
        get_fs("s3://")


# --------------------------------------------------------------------------------------------
# path safety, redaction, options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["..", "a/b", "/abs", "a%2Fb", "", ".", "a\\b", "a b", "x" * 201, "../etc"]
)
def test_safe_component_rejects(name: str) -> None:
    with pytest.raises(ValueError, match=r"^unsafe image id "):
        safe_component(name, "image id")


@pytest.mark.parametrize("name", ["line-A_1.0", "img_0001.png", "...", "x" * 200])
def test_safe_component_accepts(name: str) -> None:
    assert safe_component(name) == name


def test_join_uri_keeps_scheme_and_validates_parts() -> None:
    assert join_uri("s3://bucket/out/", "masks", "line-A", "1.png") == (
        "s3://bucket/out/masks/line-A/1.png"
    )
    assert join_uri("s3://bucket", "k") == "s3://bucket/k"
    assert join_uri("file:///tmp/x", "k") == "file:///tmp/x/k"
    assert join_uri("/", "k") == "/k"
    assert join_uri("relative/dir", "k") == "relative/dir/k"
    for bad in ("..", "a/b", "/abs", "a%2Fb"):
        with pytest.raises(ValueError, match="unsafe path component"):
            join_uri("s3://bucket/out", bad)


def test_redact_removes_credentials(monkeypatch) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    key_id = os.environ["AWS_ACCESS_KEY_ID"]
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token-value-123")
    msg = (
        f"failed with {secret} / {key_id} token session-token-value-123; "
        "config aws_secret_access_key=abcDEF/123+xyz, AWS_SESSION_TOKEN: 'tok' "
        "url https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP%2F2024"
        "&X-Amz-Signature=deadbeef id AKIAABCDEFGHIJKLMNOP"
    )
    out = redact(msg)
    for leaked in (
        secret,
        key_id,
        "session-token-value-123",
        "abcDEF/123+xyz",
        "'tok'",
        "deadbeef",
        "AKIAABCDEFGHIJKLMNOP",
    ):
        assert leaked not in out, leaked
    assert "failed with" in out and "***" in out
    assert redact("nothing secret here") == "nothing secret here"


def test_storage_options_from_env_precedence(monkeypatch) -> None:
    for var in ("DFR_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "DFR_S3_ANON"):
        monkeypatch.delenv(var, raising=False)
    assert StorageOptions.from_env() == StorageOptions()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    assert StorageOptions.from_env().s3_endpoint_url == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    assert StorageOptions.from_env().s3_endpoint_url == "http://s3-specific:2"
    monkeypatch.setenv("DFR_S3_ENDPOINT_URL", "http://ours:3")
    monkeypatch.setenv("DFR_S3_ANON", "1")
    assert StorageOptions.from_env() == StorageOptions("http://ours:3", anon=True)


def test_storage_options_picklable_and_repr_hides_userinfo() -> None:
    opts = StorageOptions("http://user:pw@host:9000")
    assert pickle.loads(pickle.dumps(opts)) == opts
    assert hash(opts) == hash(StorageOptions("http://user:pw@host:9000"))
    assert "pw" not in repr(opts) and "host:9000" in repr(opts)


def test_s3_filesystems_configured_from_options() -> None:
    opts = StorageOptions("http://127.0.0.1:1")
    fs, path = get_fs("s3://bkt/a/b.png", opts)
    assert path == "bkt/a/b.png"
    assert fs.endpoint_url == "http://127.0.0.1:1"
    assert fs.config_kwargs["retries"]["max_attempts"] == 10
    assert get_fs("s3://other/x", opts)[0] is fs  # cached per (protocol, options)
    pfs, ppath = pyarrow_fs("s3://bkt/t.parquet", opts)
    assert ppath == "bkt/t.parquet"
    assert pfs.region == "us-east-1"
    assert "testing-secret" not in repr(fs) + repr(pfs) + repr(opts)


# --------------------------------------------------------------------------------------------
# S3 backend (moto server) and Ray
# --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_round_trip(s3_bucket: str) -> None:
    _check_round_trip(join_uri(s3_bucket, "run1"), expect_prefix=s3_bucket + "/run1/")


@pytest.mark.integration
def test_s3_explicit_options_and_missing_bucket(s3_server, s3_bucket: str) -> None:
    uri = join_uri(s3_bucket, "explicit.bin")
    write_bytes_atomic(uri, b"data", s3_server.options)
    assert read_bytes(uri, s3_server.options) == b"data"
    head = s3_server.client().head_object(Bucket=s3_bucket[5:], Key="explicit.bin")
    assert head["ContentLength"] == 4
    with pytest.raises(FileNotFoundError, match="no-such-bucket-dfr"):
        list_files("s3://no-such-bucket-dfr/prefix", options=s3_server.options)
    with pytest.raises(ValueError, match="whole bucket"):
        remove_tree(s3_bucket)


@pytest.mark.integration
def test_s3_sees_writes_from_other_clients(s3_server, s3_bucket: str) -> None:
    """No stale listings: objects written behind our back (e.g. by a Ray worker) show up."""
    base = join_uri(s3_bucket, "live")
    write_bytes_atomic(join_uri(base, "1.png"), b"1")
    assert len(list_files(base)) == 1
    s3_server.client().put_object(Bucket=s3_bucket[5:], Key="live/2.png", Body=b"2")
    assert len(list_files(base)) == 2
    assert exists(join_uri(base, "2.png"))


@pytest.mark.integration
def test_pyarrow_parquet_round_trip_on_s3(s3_bucket: str) -> None:
    table = pa.table({"image_id": ["a", "b"], "score": [0.1, 0.9]})
    uri = join_uri(s3_bucket, "results", "scores.parquet")
    fs, path = pyarrow_fs(uri)
    pq.write_table(table, path, filesystem=fs)
    assert exists(uri)
    assert pq.read_table(path, filesystem=fs).equals(table)
    # Readable through the fsspec side as well: both views address the same object.
    fsspec_fs, fsspec_path = get_fs(uri)
    with fsspec_fs.open(fsspec_path, "rb") as fh:
        assert pq.read_table(fh).equals(table)


@pytest.mark.integration
def test_pyarrow_parquet_round_trip_local(tmp_path: Path) -> None:
    table = pa.table({"x": [1, 2, 3]})
    fs, path = pyarrow_fs(str(tmp_path / "t.parquet"))
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)


@pytest.mark.integration
def test_copy_to_local_downloads_and_caches(s3_bucket: str, tmp_path: Path) -> None:
    uri = join_uri(s3_bucket, "weights", "model.pth")
    write_bytes_atomic(uri, b"weights-v1")
    local = copy_to_local(uri, tmp_path / "cache")
    assert local.read_bytes() == b"weights-v1"
    assert local.name == "model.pth" and local.is_relative_to(tmp_path / "cache")
    mtime = local.stat().st_mtime_ns
    assert copy_to_local(uri, tmp_path / "cache") == local
    assert local.stat().st_mtime_ns == mtime  # reused, not re-downloaded
    with pytest.raises(FileNotFoundError):
        copy_to_local(join_uri(s3_bucket, "weights", "missing.pth"), tmp_path / "cache")


@pytest.mark.integration
def test_ray_worker_reads_s3_via_env(ray_session, s3_bucket: str) -> None:
    """Workers get the endpoint from the inherited environment, not from a pickled fs."""
    import ray

    uri = join_uri(s3_bucket, "ray", "obj.bin")
    write_bytes_atomic(uri, b"from-driver")

    @ray.remote
    def read_in_worker(target: str) -> tuple[bytes, str | None, int]:
        fs, path = storage.get_fs(target)  # options=None -> StorageOptions.from_env()
        with fs.open(path, "rb") as fh:
            data = fh.read()
        storage.write_bytes_atomic(target + ".copy", data[::-1])
        return data, storage.StorageOptions.from_env().s3_endpoint_url, os.getpid()

    data, endpoint, pid = ray.get(read_in_worker.remote(uri), timeout=120)
    assert data == b"from-driver"
    assert endpoint == os.environ["DFR_S3_ENDPOINT_URL"]
    assert pid != os.getpid()
    assert read_bytes(uri + ".copy") == b"from-driver"[::-1]
