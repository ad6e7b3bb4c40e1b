"""Training and the nightly scoring run as Ray jobs (the Ray Jobs API): what ``python -m
jobs.submit`` builds and submits.

The cluster's image already holds the package, so a job's runtime_env carries only environment
variables and, when a manifest or nightly config is a local file, a working directory holding just
that file (checked here first, so a typo fails in seconds instead of on the cluster). Remote
(s3://) manifests and files already on the cluster (``--cluster-config``) are used where they are.

runtime_env never carries credentials: anyone who can reach the dashboard can read it. Nodes get
S3 access from their IAM role (IRSA, instance profile), and variables whose names look like
secrets are refused.

``train`` passes every flag it does not own (all but ``--products``, ``--models-uri`` and the
submission options) through to ``dfr-pipeline train``, after checking them with that command's
own parser: the two cannot drift apart. Without a local file to ship, a plain
``ray job submit --address http://HEAD:8265 -- dfr-pipeline train --address auto ...`` does
the same (docs/deploy.md).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
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


def _flags(options: Mapping[str, Any]) -> list[str]:
    """``{"gpus_per_task": 0.25, "only": ("a", "b")}`` -> ``--gpus-per-task 0.25 --only a
    --only b`` (None: left to the command's default; a sequence: the flag repeated)."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        values = value if isinstance(value, list | tuple) else [value]
        for v in values:
            if v is not None:
                args += [flag, _number(v) if isinstance(v, float) else str(v)]
    return args


def check_train_args(args: Sequence[str]) -> None:
    """Parse ``dfr-pipeline train`` arguments with that command's parser (nothing runs): an
    unknown flag or a bad value is a ValueError here, not a failed job on the cluster."""
    from pipeline.cli.train import train

    try:
        train.make_context("train", list(args), resilient_parsing=False)
    except click.ClickException as exc:
        raise ValueError(f"dfr-pipeline train {shlex.join(args)}: {exc.format_message()}") from None


def train_job(
    products: str,
    models_uri: str,
    *,
    extra_args: Sequence[str] = (),
    env_vars: Mapping[str, str] | None = None,
    submission_id: str | None = None,
    **options: Any,
) -> JobSpec:
    """``dfr-pipeline train`` as a Ray job. A local manifest is validated here and shipped; its
    URIs must be absolute, since the cluster reads them, not this machine.

    ``options`` are train's flags by name (``gpus_per_task=0.25``, ``weights="s3://..."``,
    ``only=("a", "b")``), ``extra_args`` more of them as on its command line; both are checked
    with train's own parser. ``--address auto``: the job joins the cluster it runs on."""
    files: dict[str, str] = {}
    local = _local_path(products)
    if local is not None:
        from pipeline.manifest import parse_manifest

        # base_dir=None: relative paths are an error (they would resolve on the cluster).
        parse_manifest(local.read_text(encoding="utf-8-sig"), str(local), base_dir=None)
        files[MANIFEST_NAME] = str(local.resolve())
        products = MANIFEST_NAME
    args = ["dfr-pipeline", "train", "--products", products, "--models-uri", models_uri]
    args += ["--address", "auto", *_flags(options), *extra_args]
    check_train_args(args[2:])
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


def job_client(address: str) -> JobClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def submit(spec: JobSpec, address: str, client: JobClient | None = None) -> str:
    """Submit ``spec``; returns the submission id. Shipped files are staged in a temporary
    directory that becomes the job's working_dir (the client uploads it before returning)."""
    client = client or job_client(address)
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
