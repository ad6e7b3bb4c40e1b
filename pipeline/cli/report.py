"""``dfr-pipeline report``: flags -> ReportConfig -> write_report, nothing else.

The page itself: pipeline/report/.
"""

from __future__ import annotations

import sys

import click

from pipeline.cli.options import (
    EXIT_BAD_INPUT,
    echo_err,
    s3_endpoint_option,
    split_names,
    storage_options,
)
from pipeline.feedback import FeedbackError
from pipeline.report import ReportConfig, ReportError, write_report


@click.command("report")
@click.option(
    "--scores",
    "scores_uri",
    required=True,
    metavar="URI",
    help="Scoring output root (or its scores/ folder): a path, file:// or s3://.",
)
@click.option("--run-date", metavar="YYYY-MM-DD", help="Report one run date.")
@click.option("--from", "date_from", metavar="YYYY-MM-DD", help="First run date (inclusive).")
@click.option("--to", "date_to", metavar="YYYY-MM-DD", help="Last run date (inclusive).")
@click.option(
    "--products",
    multiple=True,
    metavar="NAMES",
    help="Product lines to include (repeat or comma-separate); default all.",
)
@click.option(
    "--models-uri",
    metavar="URI",
    help="Model registry root; adds training, calibration and evaluation per model version.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Local directory for report.html (created if missing).",
)
@click.option(
    "--top-n",
    default=12,
    show_default=True,
    type=click.IntRange(min=0),
    help="Highest-scoring images shown per product line.",
)
@click.option(
    "--max-error-rows",
    default=200,
    show_default=True,
    type=click.IntRange(min=0),
    help="Error rows listed per product line (counts always cover all).",
)
@click.option(
    "--feedback",
    "feedback_uri",
    metavar="URI",
    help="QA feedback table (CSV/Parquet): lists the reviewed images with their verdicts.",
)
@s3_endpoint_option
def report(
    scores_uri: str,
    run_date: str | None,
    date_from: str | None,
    date_to: str | None,
    products: tuple[str, ...],
    models_uri: str | None,
    out_dir: str,
    top_n: int,
    max_error_rows: int,
    feedback_uri: str | None,
    s3_endpoint_url: str | None,
) -> None:
    """Write a static HTML report (report.html in --out) of committed scores; prints its path."""
    try:
        config = ReportConfig(
            scores_uri=scores_uri,
            out_dir=out_dir,
            run_date=run_date,
            date_from=date_from,
            date_to=date_to,
            products=split_names(products),
            models_uri=models_uri,
            top_n=top_n,
            max_error_rows=max_error_rows,
            feedback_uri=feedback_uri,
            storage=storage_options(s3_endpoint_url),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        path = write_report(config)
    except ReportError as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    except FeedbackError as exc:
        echo_err(f"error: {exc.describe('no report was written')}")
        sys.exit(EXIT_BAD_INPUT)
    click.echo(str(path))
