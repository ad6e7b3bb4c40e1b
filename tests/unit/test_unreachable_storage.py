"""An S3 endpoint that does not answer fails the scoring run at once, naming the endpoint.

Without the probe, every read of a run retried for 80-100 s before its row became a
``read_error``: a night's job ran for hours and then committed a run of error rows, which a
rerun found "already committed". The probe (``storage.check_reachable``) makes one HEAD of the
first S3 image the run will read, before Ray starts; an endpoint that does not answer is exit 1
with nothing written. A store that answers, even "not found", lets the run go on (those rows
carry their own errors). The refused endpoint is a closed port on 127.0.0.1: no network.

botocore's own failures (no credentials, an endpoint that does not answer) are not OSErrors, so
commands' handlers missed them and ``train`` or ``models list`` printed a traceback: every
command now turns them into one ``error: S3 storage: ...`` line and exit 1.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import listing, outputs, registry, score_execute, storage
from pipeline.cli.group import main
from pipeline.cli.options import EXIT_FAILED
from pipeline.cli.score import score
from pipeline.listing_rows import Listing
from pipeline.storage import StorageOptions, StorageUnreachable, filesystems

LINE = "metal_plate"
DATE = "2024-05-01"


@pytest.fixture
def closed_endpoint() -> str:
    """An http endpoint on 127.0.0.1 that refuses connections (a port just released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_an_endpoint_that_does_not_answer_is_named(closed_endpoint):
    uri = "s3://archive/metal_plate/000.png"
    with pytest.raises(StorageUnreachable) as info:
        storage.check_reachable(uri, StorageOptions(s3_endpoint_url=closed_endpoint), attempts=1)
    message = str(info.value)
    assert f"cannot reach {closed_endpoint} to read {uri}" in message
    assert "NETWORK_CONNECTION" in message


def test_a_store_that_answers_passes_even_for_a_missing_object(s3_bucket, tmp_path):
    storage.write_bytes_atomic(f"{s3_bucket}/present.png", b"x")
    for uri in (f"{s3_bucket}/present.png", f"{s3_bucket}/missing.png"):
        assert storage.check_reachable(uri, attempts=1) is None
    assert storage.check_reachable(str(tmp_path / "nothing-here.png")) is None  # local: no probe


def _listing(tmp_path: Path, rows: list[tuple[str, str]]) -> Listing:
    path = tmp_path / "listing.csv"
    path.write_text("image_uri,product_line\n" + "".join(f"{u},{line}\n" for u, line in rows))
    return listing.load_listing(str(path), shard_size=2)


def test_the_probe_is_an_s3_image_the_run_reads(tmp_path):
    rows = [
        ("s3://archive/wood/a.png", "wood"),  # a line without a usable model: never read
        (str(tmp_path / "local.png"), LINE),
        ("s3://archive/metal_plate/../x.png", LINE),  # a bad_uri row: never read
        ("s3://archive/metal_plate/b.png", LINE),
    ]
    with _listing(tmp_path, rows) as resolved:
        first = score_execute.first_remote_uri(resolved, resolved.shards, [LINE])
        assert first == "s3://archive/metal_plate/b.png"
        assert score_execute.first_remote_uri(resolved, resolved.shards, ["wood"]) == (
            "s3://archive/wood/a.png"
        )
        assert score_execute.first_remote_uri(resolved, resolved.shards, []) is None
        local_only = {k: v for k, v in resolved.shards.items() if k[0] == "wood"}
        assert score_execute.first_remote_uri(resolved, local_only, [LINE]) is None


def test_an_unreachable_archive_fails_the_run_before_ray_and_writes_nothing(
    tmp_path, make_artifact, closed_endpoint, monkeypatch
):
    models = str(tmp_path / "models")
    registry.publish(make_artifact(tmp_path / "artifact"), models, LINE)
    listing_csv = tmp_path / "listing.csv"
    uris = [f"s3://archive/{LINE}/{i:03d}.png" for i in range(3)]
    listing_csv.write_text("image_uri,product_line\n" + "".join(f"{u},{LINE}\n" for u in uris))
    monkeypatch.setattr(filesystems, "_S3_MAX_ATTEMPTS", 1)  # one try, not 80 s of retries

    def no_ray(address: str | None) -> bool:
        raise AssertionError("Ray was started for a run whose archive cannot be reached")

    monkeypatch.setattr(score_execute, "ensure_ray", no_ray)
    out = tmp_path / "out"
    args = ["--models-uri", models, "--input", str(listing_csv), "--output", str(out)]
    args += ["--run-date", DATE, "--quiet", "--cache-dir", str(tmp_path / "cache")]
    args += ["--s3-endpoint-url", closed_endpoint]
    result = CliRunner().invoke(score, args)
    assert isinstance(result.exception, SystemExit), result.exception  # not Ray's assertion
    assert result.exit_code == EXIT_FAILED == 1, result.output
    assert f"error: cannot reach {closed_endpoint} to read {uris[0]}" in result.output
    assert outputs.committed_runs(str(out)) == []
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no shard, marker, lease or temp


def test_botocore_failures_are_described_and_nothing_else_is():
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    url = "http://127.0.0.1:9/bucket/train"
    down = storage.client_failure(EndpointConnectionError(endpoint_url=url))
    assert (
        down
        == f'S3 storage: EndpointConnectionError: Could not connect to the endpoint URL: "{url}"'
    )
    missing = storage.client_failure(NoCredentialsError())
    assert missing is not None and "AWS_ACCESS_KEY_ID" in missing and "DFR_S3_ANON" in missing
    assert storage.client_failure(OSError("disk")) is None
    assert storage.client_failure(ValueError("x")) is None


@pytest.mark.parametrize("command", ["models", "train"])
def test_a_command_without_s3_credentials_says_so_without_a_traceback(
    command, tmp_path, closed_endpoint, monkeypatch
):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    endpoint = ["--s3-endpoint-url", closed_endpoint]
    if command == "models":
        args = ["models", "list", "--models-uri", "s3://bucket/models", *endpoint]
    else:
        manifest = tmp_path / "manifest.csv"
        manifest.write_text("product_line,train_uri\nmetal_plate,s3://bucket/train\n")
        args = ["train", "--products", str(manifest), "--models-uri", str(tmp_path / "m")]
        args += endpoint
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == EXIT_FAILED, result.output
    assert "error: S3 storage: NoCredentialsError: Unable to locate credentials" in result.output
    assert "Traceback" not in result.output
