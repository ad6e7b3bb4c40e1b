"""``dfr-pipeline score`` and ``dfr-pipeline nightly``: flags -> ScoreJobConfig -> run_score_job.

Exit codes: 0 the run committed (error rows included), or was already committed; 1 the job could
not run (an unreadable listing, an S3 endpoint that does not answer) or was stopped before
committing; 3 the run committed but more than ``--max-error-fraction`` of its rows are errors
(alerting should look at it); 4 the input lists
no image (without ``--allow-empty``): an upstream export probably broke; 5 another run of the
same output and date holds the lease (or took it over), so this one did nothing; 6 (``nightly``
only) the run committed but at least one product line drifted from its model's reference (one
``DRIFT`` line each is printed; 3 wins when both apply). Click itself uses 2 for bad flags.
"""

from __future__ import annotations

import datetime as dt
import sys

import click

from pipeline.cli.options import (
    EXIT_DRIFT,
    EXIT_EMPTY_INPUT,
    EXIT_FAILED,
    EXIT_LEASE_HELD,
    EXIT_TOO_MANY_ERRORS,
    CommandGroup,
    address_option,
    s3_endpoint_option,
    storage_options,
)
from pipeline.listing import ListingError
from pipeline.nightly_config import NightlyConfigError, load_config
from pipeline.outputs import MASK_MODES
from pipeline.run_lease import LeaseHeld, LeaseLost
from pipeline.score_job import (
    DEFAULT_CACHE_DIR,
    EmptyInput,
    RunInterrupted,
    ScoreJobConfig,
    ShardCountError,
    run_score_job,
)
from pipeline.storage import StorageUnreachable


def parse_actors(value: str) -> tuple[int, int]:
    """``N`` (a fixed pool) or ``MIN:MAX`` (an autoscaling pool) -> (min, max)."""
    try:
        if ":" in value:
            low, high = (int(part) for part in value.split(":", 1))
        else:
            low = high = int(value)
    except ValueError:
        raise click.BadParameter(f"expected N or MIN:MAX, got {value!r}") from None
    if low < 1 or high < low:
        raise click.BadParameter(f"need 1 <= MIN <= MAX, got {value!r}")
    return low, high


def today_utc() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def execute(config: ScoreJobConfig, drift_exit: bool = False) -> None:
    """Run the job, print its summary and exit with the code documented above."""
    try:
        summary = run_score_job(config)
    except (ListingError, RunInterrupted, ShardCountError, StorageUnreachable) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except EmptyInput as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_EMPTY_INPUT)
    except (LeaseHeld, LeaseLost) as exc:
        where = f"{config.output_uri} (run date {config.run_date})"
        click.echo(f"error: not scoring {where}: {exc}", err=True)
        sys.exit(EXIT_LEASE_HELD)
    click.echo(summary.format())
    for drift in summary.drifting:
        click.echo(drift.describe(), err=True)
    if summary.failed:
        sys.exit(EXIT_TOO_MANY_ERRORS)
    if drift_exit and summary.drifting:
        sys.exit(EXIT_DRIFT)


@click.command("score")
@click.option("--models-uri", required=True, help="Model registry ({line}/{version}/, LATEST).")
@click.option(
    "--input",
    "input_uri",
    required=True,
    help="Listing file (.parquet/.csv: image_uri, product_line[, image_id, captured_at]) "
    "or a prefix laid out as <prefix>/<product_line>/**/<image>.",
)
@click.option("--output", "output_uri", required=True, help="Output root (local path or s3://).")
@click.option("--run-date", default=None, help="YYYY-MM-DD partition; default: today (UTC).")
@click.option("--run-id", default=None, help="Default: derived from the date and the content.")
@click.option("--products", default="", help="Comma-separated product lines; default: all.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--actors",
    default=None,
    help="Scoring actors: N or MIN:MAX; default: one per GPU, else one per CPU (memory allowing).",
)
@click.option(
    "--gpus-per-actor",
    type=click.FloatRange(min=0),
    default=None,
    help="Default: 1 when the cluster has GPUs, else 0.",
)
@click.option(
    "--cpus-per-actor",
    type=click.FloatRange(min=0),
    default=None,
    help="Default: 1 with GPUs, else the node's CPUs less a decode reserve, per actor.",
)
@click.option(
    "--decode-cpus",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="CPUs per read/decode task (default 0.25). Decoding never runs in the actors.",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(min=1),
    default=None,
    help="Intra-op threads per actor; default: the node's CPUs / its actors (1 with a GPU).",
)
@click.option("--masks", type=click.Choice(MASK_MODES), default="anomalous", show_default=True)
@click.option("--heatmaps", is_flag=True, help="Also write a heatmap PNG beside each mask.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option(
    "--max-error-fraction",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Exit 3 when more than this fraction of rows are errors.",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="An input that lists no image commits an empty run (exit 0) instead of exit 4.",
)
@click.option(
    "--drift-level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.001,
    show_default=True,
    help="Significance level of the drift tests (see docs/operating.md).",
)
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True)
@address_option
@s3_endpoint_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
def score(
    models_uri: str,
    input_uri: str,
    output_uri: str,
    run_date: str | None,
    run_id: str | None,
    products: str,
    batch_size: int,
    actors: str | None,
    gpus_per_actor: float | None,
    cpus_per_actor: float | None,
    decode_cpus: float | None,
    torch_threads: int | None,
    masks: str,
    heatmaps: bool,
    shard_size: int,
    max_error_fraction: float,
    allow_empty: bool,
    drift_level: float,
    cache_dir: str,
    address: str | None,
    s3_endpoint_url: str | None,
    quiet: bool,
) -> None:
    """Score images with each product line's LATEST model; write Parquet scores and PNG masks."""
    min_actors, max_actors = parse_actors(actors) if actors else (None, None)
    try:
        config = ScoreJobConfig(
            models_uri=models_uri,
            input_uri=input_uri,
            output_uri=output_uri,
            run_date=run_date or today_utc(),
            run_id=run_id,
            products=tuple(p.strip() for p in products.split(",") if p.strip()),
            batch_size=batch_size,
            min_actors=min_actors,
            max_actors=max_actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
            decode_cpus=decode_cpus,
            torch_threads=torch_threads,
            masks=masks,
            heatmaps=heatmaps,
            shard_size=shard_size,
            max_error_fraction=max_error_fraction,
            allow_empty=allow_empty,
            drift_level=drift_level,
            cache_dir=cache_dir,
            address=address,
            storage=storage_options(s3_endpoint_url),
            quiet=quiet,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    execute(config)


@click.command("nightly")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Nightly YAML (see jobs/nightly.yaml).",
)
@click.option("--run-date", default=None, help="Override the config's run date (YYYY-MM-DD).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def nightly(config_path: str, run_date: str | None, quiet: bool) -> None:
    """The scheduled run: fix the date, pin LATEST models, score, commit the run record."""
    try:
        config = load_config(config_path, run_date=run_date, quiet=quiet)
    except (NightlyConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    execute(config, drift_exit=True)


if __name__ == "__main__":  # the torch-free driver ``dfr-pipeline score`` re-executes as
    # (pipeline.driver_exec)
    CommandGroup("dfr-pipeline", commands=[score, nightly])(prog_name="dfr-pipeline")
