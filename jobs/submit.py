"""Submit training and the nightly scoring run to a Ray cluster through the Ray Jobs API.

    python -m jobs.submit train --address http://HEAD:8265 \\
        --products s3://dfr-config/products.csv --models-uri s3://dfr-models --gpus-per-task 0.25
    python -m jobs.submit nightly --address http://HEAD:8265 --config jobs/nightly.yaml
    python -m jobs.submit nightly ... --dry-run    # print the job as JSON, submit nothing

What a job is (its command line, runtime_env, shipped files) and how it is submitted:
pipeline/ray_jobs.py. ``train`` passes every flag it does not own through to ``dfr-pipeline
train``, checked by that command's own parser first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial, wraps
from typing import Any, NamedTuple

import click

from pipeline import ray_jobs
from pipeline.ray_jobs import JobSpec, nightly_job, submit, train_job, wait

EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2


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


class Submission(NamedTuple):
    """The options every job command has (defined once, in `_common`)."""

    address: str | None
    env: tuple[str, ...]
    submission_id: str | None
    dry_run: bool
    wait_for_end: bool


def _run(build: Callable[..., JobSpec], submission: Submission) -> None:
    """Build the job (bad input: exit 2), then print it or submit it (and maybe wait).
    ``build`` takes the options every job has (env_vars, submission_id)."""
    address, dry_run, wait_for_end = submission.address, submission.dry_run, submission.wait_for_end
    env_vars = _parse_env(submission.env)
    try:
        spec = build(env_vars=env_vars, submission_id=submission.submission_id)
    except (ValueError, OSError) as exc:  # ManifestError and NightlyConfigError are ValueErrors
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    if dry_run:
        click.echo(spec.to_json())
        return
    if not address:
        raise click.UsageError("--address (or RAY_API_SERVER_ADDRESS / RAY_ADDRESS) is required")
    try:
        client = ray_jobs.job_client(
            address
        )  # the client checks the cluster's version when constructed
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

    @wraps(func)
    def with_submission(*args: Any, **kwargs: Any) -> None:
        submission = Submission(*(kwargs.pop(name) for name in Submission._fields))
        func(*args, submission=submission, **kwargs)

    command: Callable[..., None] = with_submission
    for option in reversed(options):
        command = option(command)
    return command


@click.group()
def cli() -> None:
    """Submit dfr-pipeline jobs to a Ray cluster (Ray Jobs API)."""


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--products", required=True, metavar="URI", help="Manifest: local file or s3://.")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@_common
@click.pass_context
def train(
    ctx: click.Context,
    products: str,
    models_uri: str,
    submission: Submission,
) -> None:
    """Submit `dfr-pipeline train` (one model per product line of a manifest).

    Every other flag (--gpus-per-task, --backbone, --only, --retries, model options, ...) goes
    to `dfr-pipeline train` as given; see `dfr-pipeline train --help`."""
    build = partial(train_job, products, models_uri, extra_args=tuple(ctx.args))
    _run(build, submission)


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
    submission: Submission,
) -> None:
    """Submit the nightly scoring run (`python -m jobs.nightly`)."""
    build = partial(
        nightly_job, config, cluster_config=cluster_config, run_date=run_date, quiet=not progress
    )
    _run(build, submission)


def main() -> None:
    cli(prog_name="python -m jobs.submit")


if __name__ == "__main__":
    main()
