"""``dfr-pipeline demo``: the newcomer's end-to-end run on generated images (pipeline.demo)."""

from __future__ import annotations

import sys

import click

from dfr_core.backbones import WeightsNotFoundError
from pipeline.cli.options import EXIT_BAD_INPUT, EXIT_FAILED, echo_err
from pipeline.cli.train import format_results
from pipeline.demo import DemoConfig, run_demo


@click.command("demo")
@click.option(
    "--workdir",
    default="dfr-demo",
    show_default=True,
    type=click.Path(),
    help="Where the synthetic data, manifest and models are written.",
)
def demo(workdir: str) -> None:
    """Generate a synthetic archive, train on local Ray, evaluate, and say where it all is."""
    try:
        result = run_demo(DemoConfig(workdir=workdir), echo=echo_err)
    except WeightsNotFoundError as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    click.echo(format_results(result.train))
    if result.score is not None:
        click.echo(result.score.format())
    click.echo(result.describe())
    if result.train.failed:
        sys.exit(EXIT_FAILED)
