"""jobs.submit: the Ray Jobs it builds (entrypoints the real commands accept, runtime_env without
credentials, local inputs validated and shipped) and how it submits them, against a fake
JobSubmissionClient: no Ray cluster is needed."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from ray.job_submission import JobStatus

from jobs import submit
from pipeline import ray_jobs
from pipeline.manifest import ManifestError
from pipeline.nightly_config import NightlyConfigError
from pipeline.ray_jobs import check_env_vars, nightly_job, submit_nightly, submit_train, train_job

REPO = Path(__file__).resolve().parents[2]
NIGHTLY_YAML = REPO / "jobs" / "nightly.yaml"
MANIFEST = "product_line,train_uri\nwidget,s3://archive/train/widget/\ngear,s3://archive/gear/\n"


class FakeClient:
    """Records submissions; reports the given statuses in turn."""

    def __init__(self, statuses: tuple[str, ...] = ("SUCCEEDED",)) -> None:
        self.submitted: list[dict[str, Any]] = []
        self.staged: dict[str, bytes] = {}
        self.working_dir: Path | None = None
        self.statuses = list(statuses)

    def submit_job(self, **kwargs: Any) -> str:
        self.submitted.append(kwargs)
        working_dir = kwargs["runtime_env"].get("working_dir")
        if working_dir:  # read now: the staging directory is gone after submit returns
            self.working_dir = Path(working_dir)
            self.staged = {p.name: p.read_bytes() for p in self.working_dir.iterdir()}
        return "raysubmit_test"

    def get_job_status(self, job_id: str) -> JobStatus:
        return JobStatus(self.statuses.pop(0))

    def get_job_logs(self, job_id: str) -> str:
        return "scoring...\nrun 2025-01-31 committed"


def _parse(entrypoint: str) -> Any:
    """Parse an entrypoint with the click command it runs (without running it)."""
    args = shlex.split(entrypoint)
    if args[0] == "dfr-pipeline":
        from pipeline.cli import main

        return main.commands[args[1]].make_context(args[1], args[2:])
    assert args[:3] == ["python", "-m", "jobs.nightly"]
    from pipeline.cli.score import nightly

    return nightly.make_context("jobs.nightly", args[3:])


# --------------------------------------------------------------------------------------------
# Building jobs
# --------------------------------------------------------------------------------------------


def test_train_job_runs_the_train_command_on_the_cluster():
    spec = train_job(
        "s3://cfg/products.csv",
        "s3://dfr-models",
        gpus_per_task=0.25,
        cpus_per_task=3.0,
        backbone="vgg19",
        weights="s3://weights/vgg19-dcbb9e9d.pth",
        only=("widget", "gear"),
    )
    assert spec.files == {}
    assert spec.runtime_env == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert spec.metadata["command"] == "train"
    params = _parse(spec.entrypoint).params
    assert params["manifest_uri"] == "s3://cfg/products.csv"
    assert params["models_uri"] == "s3://dfr-models"
    assert params["address"] == "auto"
    assert (params["gpus_per_task"], params["cpus_per_task"]) == (0.25, 3.0)
    assert (params["backbone"], params["weights_uri"]) == (
        "vgg19",
        "s3://weights/vgg19-dcbb9e9d.pth",
    )
    assert params["only"] == ("widget", "gear")


def test_train_job_leaves_unset_options_to_the_command_defaults():
    args = shlex.split(train_job("s3://cfg/products.csv", "s3://dfr-models").entrypoint)
    assert args == [
        "dfr-pipeline", "train", "--products", "s3://cfg/products.csv",
        "--models-uri", "s3://dfr-models", "--address", "auto",
    ]  # fmt: skip


def test_values_with_spaces_and_quotes_survive_the_command_line():
    uri = "s3://bucket/it's a prefix"
    assert _parse(train_job("s3://cfg/p.csv", uri).entrypoint).params["models_uri"] == uri


def test_a_local_manifest_is_validated_and_shipped(tmp_path):
    manifest = tmp_path / "lines.csv"
    manifest.write_text(MANIFEST)
    spec = train_job(str(manifest), "s3://dfr-models")
    assert spec.files == {"products.csv": str(manifest.resolve())}
    assert _parse(spec.entrypoint).params["manifest_uri"] == "products.csv"
    assert train_job(f"file://{manifest}", "s3://dfr-models").files == spec.files


def test_a_local_manifest_with_relative_paths_is_refused(tmp_path):
    manifest = tmp_path / "lines.csv"
    manifest.write_text("product_line,train_uri\nwidget,images/widget\n")
    with pytest.raises(ManifestError, match="relative path"):
        train_job(str(manifest), "s3://dfr-models")


def test_a_local_nightly_config_is_validated_and_shipped(tmp_path, monkeypatch):
    spec = nightly_job(str(NIGHTLY_YAML))
    assert spec.files == {"nightly.yaml": str(NIGHTLY_YAML.resolve())}
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "jobs.nightly", "--config", "nightly.yaml", "--quiet",
    ]  # fmt: skip
    (tmp_path / "nightly.yaml").write_bytes(NIGHTLY_YAML.read_bytes())
    monkeypatch.chdir(tmp_path)  # the job's working_dir, where the shipped file lands
    assert _parse(spec.entrypoint).params["config_path"] == "nightly.yaml"


def test_a_bad_nightly_config_is_refused_before_submission(tmp_path):
    config = tmp_path / "nightly.yaml"
    config.write_text(NIGHTLY_YAML.read_text() + "max_actor: 3\n")
    with pytest.raises(NightlyConfigError, match="max_actor"):
        nightly_job(str(config))


def test_a_cluster_config_path_is_used_where_it_is():
    spec = nightly_job(cluster_config="/etc/dfr/nightly.yaml", run_date="2025-01-31", quiet=False)
    assert spec.files == {}
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "jobs.nightly", "--config", "/etc/dfr/nightly.yaml",
        "--run-date", "2025-01-31",
    ]  # fmt: skip
    assert spec.metadata == {"app": "dfr-pipeline", "command": "nightly", "run_date": "2025-01-31"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"config": str(NIGHTLY_YAML), "cluster_config": "/etc/dfr/nightly.yaml"},
        {"cluster_config": "/etc/dfr/nightly.yaml", "run_date": "31/01/2025"},
    ],
    ids=["no config", "two configs", "bad run date"],
)
def test_nightly_job_refuses_ambiguous_or_bad_input(kwargs):
    with pytest.raises(ValueError):
        nightly_job(**kwargs)


@pytest.mark.parametrize(
    "name",
    ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "DB_PASSWORD", "1BAD"],
)
def test_runtime_env_refuses_credentials_and_bad_names(name):
    with pytest.raises(ValueError):
        check_env_vars({name: "x"})
    with pytest.raises(ValueError):
        train_job("s3://cfg/p.csv", "s3://m", env_vars={name: "x"})


def test_runtime_env_carries_plain_settings():
    env = {"DFR_S3_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-west-1"}
    spec = nightly_job(cluster_config="/etc/dfr/nightly.yaml", env_vars=env)
    assert spec.runtime_env == {"env_vars": {"PYTHONUNBUFFERED": "1", **env}}


# --------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------


def test_shipped_files_become_the_jobs_working_dir(tmp_path):
    manifest = tmp_path / "lines.csv"
    manifest.write_text(MANIFEST)
    client = FakeClient()
    job_id = submit_train(
        "http://head:8265", str(manifest), "s3://dfr-models", client=client, submission_id="t-1"
    )
    assert job_id == "raysubmit_test"
    (call,) = client.submitted
    assert client.staged == {"products.csv": MANIFEST.encode()}
    assert call["runtime_env"]["env_vars"] == {"PYTHONUNBUFFERED": "1"}
    assert call["submission_id"] == "t-1"
    assert call["metadata"] == {"app": "dfr-pipeline", "command": "train"}
    assert "--products products.csv" in call["entrypoint"]
    assert client.working_dir is not None and not client.working_dir.exists()


def test_nothing_shipped_means_no_working_dir():
    client = FakeClient()
    submit_nightly("http://head:8265", cluster_config="/etc/dfr/nightly.yaml", client=client)
    (call,) = client.submitted
    assert "working_dir" not in call["runtime_env"]
    assert call["entrypoint"].startswith("python -m jobs.nightly --config /etc/dfr/nightly.yaml")


def test_wait_reports_each_status_change_until_the_job_ends():
    client = FakeClient(("PENDING", "RUNNING", "RUNNING", "FAILED"))
    seen: list[str] = []
    sleeps: list[float] = []
    status = ray_jobs.wait(client, "j", poll_s=5, echo=seen.append, sleep=sleeps.append)
    assert status == "FAILED"
    assert seen == ["j: PENDING", "j: RUNNING", "j: FAILED"]
    assert sleeps == [5, 5, 5]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constructing a Jobs client fails the test; no address comes from the environment."""

    def refuse(address: str) -> None:
        raise AssertionError("a dry run must not contact the cluster")

    monkeypatch.setattr(ray_jobs, "job_client", refuse)
    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def test_dry_run_prints_the_job_and_contacts_nothing(no_cluster):
    args = ["nightly", "--config", str(NIGHTLY_YAML), "--run-date", "2025-01-31", "--dry-run"]
    result = CliRunner().invoke(submit.cli, args)
    assert result.exit_code == 0, result.output
    job = json.loads(result.output)
    assert job["entrypoint"] == (
        "python -m jobs.nightly --config nightly.yaml --run-date 2025-01-31 --quiet"
    )
    assert job["runtime_env"] == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    assert job["files"] == {"nightly.yaml": str(NIGHTLY_YAML.resolve())}


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--products", "missing.csv", "--models-uri", "s3://m"],
        [
            "train",
            "--products",
            "s3://c/p.csv",
            "--models-uri",
            "s3://m",
            "--env",
            "AWS_SECRET_ACCESS_KEY=abc",
        ],
        ["nightly", "--cluster-config", "/etc/dfr/nightly.yaml", "--run-date", "tomorrow"],
    ],  # fmt: skip
    ids=["missing manifest", "credential in env", "bad run date"],
)
def test_bad_input_exits_2_before_contacting_the_cluster(args, no_cluster):
    result = CliRunner().invoke(submit.cli, [*args, "--address", "http://head:8265"])
    assert result.exit_code == 2
    assert "error:" in result.output


def test_an_address_is_required_to_submit(no_cluster):
    args = ["nightly", "--cluster-config", "/etc/dfr/nightly.yaml"]
    result = CliRunner().invoke(submit.cli, args)
    assert result.exit_code == 2
    assert "--address" in result.output


@pytest.mark.parametrize(("final", "exit_code"), [("SUCCEEDED", 0), ("STOPPED", 1)])
def test_submit_and_wait_exits_with_the_jobs_outcome(final, exit_code, monkeypatch):
    client = FakeClient(("RUNNING", final))
    monkeypatch.setattr(ray_jobs, "job_client", lambda address: client)
    monkeypatch.setattr(ray_jobs.time, "sleep", lambda seconds: None)
    args = ["nightly", "--cluster-config", "/etc/dfr/nightly.yaml", "--wait"]
    result = CliRunner().invoke(submit.cli, [*args, "--address", "http://head:8265"])
    assert result.exit_code == exit_code, result.output
    assert "submitted raysubmit_test to http://head:8265" in result.output
    assert f"raysubmit_test: {final}" in result.output
    assert "run 2025-01-31 committed" in result.output  # the log's tail


def test_runs_as_python_dash_m():
    command = [sys.executable, "-m", "jobs.submit", "train", "--products", "s3://c/p.csv"]
    command += ["--models-uri", "s3://m", "--gpus-per-task", "0.5", "--dry-run"]
    out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
    assert "--gpus-per-task 0.5" in json.loads(out.stdout)["entrypoint"]


def test_train_passes_every_train_flag_through(no_cluster):
    """Flags jobs.submit does not own reach `dfr-pipeline train` as given (no re-declared copy
    to drift: --retries and --min-images were missing from it)."""
    args = ["train", "--products", "s3://c/p.csv", "--models-uri", "s3://m", "--retries", "5"]
    args += ["--min-images", "8", "--only", "a,b", "--epochs", "3", "--dry-run"]
    result = CliRunner().invoke(submit.cli, args)
    assert result.exit_code == 0, result.output
    params = _parse(json.loads(result.output)["entrypoint"]).params
    assert (params["retries"], params["min_images"], params["epochs"]) == (5, 8, 3)
    assert params["only"] == ("a,b",) and params["address"] == "auto"


@pytest.mark.parametrize("flag", [["--no-such-flag", "1"], ["--epochs", "zero"]])
def test_train_flags_are_checked_by_trains_parser_before_submission(flag, no_cluster):
    args = ["train", "--products", "s3://c/p.csv", "--models-uri", "s3://m", *flag]
    result = CliRunner().invoke(submit.cli, [*args, "--address", "http://head:8265"])
    assert result.exit_code == 2
    assert "error: dfr-pipeline train" in result.output
    with pytest.raises(ValueError, match="no-such-flag"):
        train_job("s3://c/p.csv", "s3://m", extra_args=("--no-such-flag", "1"))


def test_an_unreachable_cluster_exits_1_with_the_address(monkeypatch):
    def unreachable(address: str) -> None:
        raise ConnectionError(f"Failed to connect to Ray at address: {address}.")

    monkeypatch.setattr(ray_jobs, "job_client", unreachable)
    args = ["nightly", "--cluster-config", "/etc/dfr/nightly.yaml", "--address", "http://h:8265"]
    result = CliRunner().invoke(submit.cli, args)
    assert result.exit_code == 1
    assert "cannot reach the Ray Jobs API at http://h:8265" in result.output
