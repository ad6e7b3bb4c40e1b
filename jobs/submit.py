"""Submit training and the nightly scoring run to a Ray cluster through the Ray Jobs API.

    python -m jobs.submit train --address http://HEAD:8265 \\
        --products s3://dfr-config/products.csv --models-uri s3://dfr-models --gpus-per-task 0.25
    python -m jobs.submit nightly --address http://HEAD:8265 --config jobs/nightly.yaml
    python -m jobs.submit nightly ... --dry-run    # print the job as JSON, submit nothing

The cluster's image already holds the package, so a job's runtime_env carries only environment
variables and, when a manifest or nightly config is a local file, a working directory holding just
that file (checked here first, so a typo fails in seconds instead of on the cluster). Remote
(s3://) manifests and files already on the cluster (``--cluster-config``) are used where they are.

runtime_env never carries credentials: anyone who can reach the dashboard can read it. Nodes get
S3 access from their IAM role (IRSA, instance profile), and variables whose names look like
secrets are refused.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

#: Environment variable names that hold secrets; runtime_env must never carry them.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY", re.I)
#: Names of shipped files in the job's working directory.
MANIFEST_NAME = "products.csv"
NIGHTLY_NAME = "nightly.yaml"
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2


class JobClient(Protocol):
    """The part of ray.job_submission.JobSubmissionClient used here."""

    def submit_job(self, **kwargs: Any) -> str: ...

    def get_job_status(self, job_id: str) -> Any: ...

    def get_job_logs(self, job_id: str) -> str: ...


@dataclass(frozen=True)
class JobSpec:
    """One Ray job: the command line, its runtime_env, and local files shipped beside it."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    files: dict[str, str] = field(default_factory=dict)  # name in working_dir -> local path
    submission_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "entrypoint": self.entrypoint,
                "runtime_env": self.runtime_env,
                "files": self.files,
                "metadata": self.metadata,
                "submission_id": self.submission_id,
            },
            indent=2,
        )


def check_env_vars(env_vars: Mapping[str, str]) -> dict[str, str]:
    """Environment variables fit for a runtime_env: string values, no secret-like names."""
    checked: dict[str, str] = {}
    for name, value in env_vars.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if SECRET_NAME.search(name):
            raise ValueError(
                f"{name} looks like a credential: runtime_env is visible in the Ray dashboard; "
                "give the nodes an IAM role (IRSA or an instance profile) instead"
            )
        if not isinstance(value, str):
            raise ValueError(f"{name}: environment values must be strings, got {value!r}")
        checked[name] = value
    return checked


def runtime_env(env_vars: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The runtime_env of every job: unbuffered output (live logs) plus the given variables."""
    return {"env_vars": {"PYTHONUNBUFFERED": "1", **check_env_vars(env_vars or {})}}


def _local_path(uri: str) -> Path | None:
    """The local file a URI names, or None for a remote one (s3://...)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


def _number(value: float) -> str:
    return f"{value:g}"


def train_job(
    products: str,
    models_uri: str,
    *,
    gpus_per_task: float | None = None,
    cpus_per_task: float | None = None,
    backbone: str | None = None,
    weights: str | None = None,
    epochs: int | None = None,
    image_size: int | None = None,
    only: Sequence[str] = (),
    s3_endpoint_url: str | None = None,
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
) -> JobSpec:
    """``dfr-pipeline train`` as a Ray job. A local manifest is validated here and shipped; its
    URIs must be absolute, since the cluster reads them, not this machine."""
    files: dict[str, str] = {}
    local = _local_path(products)
    if local is not None:
        from pipeline.manifest import parse_manifest

        # base_dir=None: relative paths are an error (they would resolve on the cluster).
        parse_manifest(local.read_text(encoding="utf-8-sig"), str(local), base_dir=None)
        files[MANIFEST_NAME] = str(local.resolve())
        products = MANIFEST_NAME
    args = ["dfr-pipeline", "train", "--products", products, "--models-uri", models_uri]
    args += ["--address", "auto"]
    optional: list[tuple[str, object]] = [
        ("--gpus-per-task", gpus_per_task),
        ("--cpus-per-task", cpus_per_task),
        ("--backbone", backbone),
        ("--weights", weights),
        ("--epochs", epochs),
        ("--image-size", image_size),
        ("--s3-endpoint-url", s3_endpoint_url),
    ]
    for flag, value in optional:
        if value is not None:
            args += [flag, _number(value) if isinstance(value, float) else str(value)]
    for name in only:
        args += ["--only", name]
    return JobSpec(
        entrypoint=shlex.join(args),
        runtime_env=runtime_env(env_vars),
        metadata={"app": "dfr-pipeline", "command": "train"},
        files=files,
        submission_id=submission_id,
    )


def nightly_job(
    config: str | None = None,
    *,
    cluster_config: str | None = None,
    run_date: str | None = None,
    quiet: bool = True,
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
) -> JobSpec:
    """``python -m jobs.nightly`` as a Ray job, from a local config (validated here and shipped)
    or from ``cluster_config``, a path on the cluster's head (e.g. a mounted ConfigMap)."""
    from pipeline.nightly_config import load_config, resolve_run_date

    if (config is None) == (cluster_config is None):
        raise ValueError("give exactly one of a local config and a cluster config path")
    files: dict[str, str] = {}
    if config is not None:
        load_config(config, run_date=run_date)  # raises NightlyConfigError naming the problem
        files[NIGHTLY_NAME] = str(Path(config).resolve())
        path = NIGHTLY_NAME
    else:
        if run_date is not None:
            resolve_run_date(run_date)  # the config itself is only readable on the cluster
        path = str(cluster_config)
    args = ["python", "-m", "jobs.nightly", "--config", path]
    if run_date is not None:
        args += ["--run-date", run_date]
    if quiet:
        args.append("--quiet")
    metadata = {"app": "dfr-pipeline", "command": "nightly"}
    if run_date is not None:
        metadata["run_date"] = run_date
    return JobSpec(
        entrypoint=shlex.join(args),
        runtime_env=runtime_env(env_vars),
        metadata=metadata,
        files=files,
        submission_id=submission_id,
    )


def _client(address: str) -> JobClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(spec: JobSpec, address: str, client: JobClient | None = None) -> str:
    """Submit ``spec``; returns the submission id. Shipped files are staged in a temporary
    directory that becomes the job's working_dir (the client uploads it before returning)."""
    client = client or _client(address)
    with tempfile.TemporaryDirectory(prefix="dfr-job-") as staging:
        env = dict(spec.runtime_env)
        if spec.files:
            for name, source in spec.files.items():
                shutil.copyfile(source, Path(staging) / name)
            env["working_dir"] = staging
        return client.submit_job(
            entrypoint=spec.entrypoint,
            runtime_env=env,
            metadata=spec.metadata,
            submission_id=spec.submission_id,
        )


def submit_train(
    address: str,
    products: str,
    models_uri: str,
    *,
    client: JobClient | None = None,
    **options: Any,
) -> str:
    """Submit ``dfr-pipeline train`` (options as in train_job); returns the submission id."""
    return submit(train_job(products, models_uri, **options), address, client)


def submit_nightly(
    address: str,
    config: str | None = None,
    *,
    client: JobClient | None = None,
    **options: Any,
) -> str:
    """Submit the nightly scoring run (options as in nightly_job); returns the submission id."""
    return submit(nightly_job(config, **options), address, client)


def wait(
    client: JobClient,
    job_id: str,
    poll_s: float = 10.0,
    echo: Callable[[str], None] = print,
    sleep: Callable[[float], None] | None = None,
) -> str:
    """Poll until the job ends, echoing each status change; returns the final status name."""
    sleep = sleep or time.sleep
    last = None
    while True:
        status = client.get_job_status(job_id)
        name = getattr(status, "value", str(status))
        if name != last:
            echo(f"{job_id}: {name}")
            last = name
        if name in ("SUCCEEDED", "FAILED", "STOPPED"):
            return name
        sleep(poll_s)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--env")
        env[name] = value
    return env


def _run(
    build: Callable[[], JobSpec], address: str | None, dry_run: bool, wait_for_end: bool
) -> None:
    """Build the job (bad input: exit 2), then print it or submit it (and maybe wait)."""
    try:
        spec = build()
    except (ValueError, OSError) as exc:  # ManifestError and NightlyConfigError are ValueErrors
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if dry_run:
        click.echo(spec.to_json())
        return
    if not address:
        raise click.UsageError("--address (or RAY_API_SERVER_ADDRESS / RAY_ADDRESS) is required")
    try:
        client = _client(address)  # the client checks the cluster's version when constructed
        job_id = submit(spec, address, client)
    except ConnectionError as exc:
        click.echo(f"error: cannot reach the Ray Jobs API at {address}: {exc}", err=True)
        sys.exit(EXIT_JOB_FAILED)
    click.echo(f"submitted {job_id} to {address}")
    click.echo(f"  logs:   ray job logs --address {address} --follow {job_id}")
    if wait_for_end:
        status = wait(client, job_id, echo=click.echo)
        tail = client.get_job_logs(job_id).splitlines()[-40:]
        click.echo("\n".join(tail))
        if status != "SUCCEEDED":
            sys.exit(EXIT_JOB_FAILED)


def _common(func: Callable[..., None]) -> Callable[..., None]:
    options = [
        click.option(
            "--address",
            envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
            default=None,
            help="Ray Jobs API, e.g. http://head:8265 (env RAY_API_SERVER_ADDRESS, RAY_ADDRESS).",
        ),
        click.option(
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            help="Environment variable for the job (repeatable; never credentials).",
        ),
        click.option("--submission-id", default=None, help="Job id; default: Ray picks one."),
        click.option("--dry-run", is_flag=True, help="Print the job as JSON; submit nothing."),
        click.option(
            "--wait", "wait_for_end", is_flag=True, help="Wait; exit 1 unless it succeeds."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


@click.group()
def cli() -> None:
    """Submit dfr-pipeline jobs to a Ray cluster (Ray Jobs API)."""


@cli.command()
@click.option("--products", required=True, metavar="URI", help="Manifest: local file or s3://.")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@click.option("--gpus-per-task", type=click.FloatRange(min=0), default=None)
@click.option("--cpus-per-task", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--backbone", default=None, help="Default backbone of the lines.")
@click.option("--weights", default=None, metavar="URI", help="Backbone weights, e.g. s3://...")
@click.option("--epochs", type=click.IntRange(min=1), default=None)
@click.option("--image-size", type=click.IntRange(min=32), default=None)
@click.option("--only", multiple=True, metavar="PRODUCT", help="Train only these lines.")
@click.option("--s3-endpoint-url", default=None, metavar="URL", help="S3-compatible endpoint.")
@_common
def train(
    products: str,
    models_uri: str,
    gpus_per_task: float | None,
    cpus_per_task: float | None,
    backbone: str | None,
    weights: str | None,
    epochs: int | None,
    image_size: int | None,
    only: tuple[str, ...],
    s3_endpoint_url: str | None,
    address: str | None,
    env: tuple[str, ...],
    submission_id: str | None,
    dry_run: bool,
    wait_for_end: bool,
) -> None:
    """Submit `dfr-pipeline train` (one model per product line of a manifest)."""
    env_vars = _parse_env(env)
    _run(
        lambda: train_job(
            products,
            models_uri,
            gpus_per_task=gpus_per_task,
            cpus_per_task=cpus_per_task,
            backbone=backbone,
            weights=weights,
            epochs=epochs,
            image_size=image_size,
            only=only,
            s3_endpoint_url=s3_endpoint_url,
            env_vars=env_vars,
            submission_id=submission_id,
        ),
        address,
        dry_run,
        wait_for_end,
    )


@cli.command()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Local nightly YAML, validated here and shipped with the job.",
)
@click.option(
    "--cluster-config",
    default=None,
    metavar="PATH",
    help="A nightly YAML already on the cluster's head (e.g. /etc/dfr/nightly.yaml).",
)
@click.option("--run-date", default=None, help="Override the config's run date.")
@click.option("--progress", is_flag=True, help="Keep progress bars in the job's log.")
@_common
def nightly(
    config: str | None,
    cluster_config: str | None,
    run_date: str | None,
    progress: bool,
    address: str | None,
    env: tuple[str, ...],
    submission_id: str | None,
    dry_run: bool,
    wait_for_end: bool,
) -> None:
    """Submit the nightly scoring run (`python -m jobs.nightly`)."""
    env_vars = _parse_env(env)
    _run(
        lambda: nightly_job(
            config,
            cluster_config=cluster_config,
            run_date=run_date,
            quiet=not progress,
            env_vars=env_vars,
            submission_id=submission_id,
        ),
        address,
        dry_run,
        wait_for_end,
    )


def main() -> None:
    cli(prog_name="python -m jobs.submit")


if __name__ == "__main__":
    main()
