"""The ``dfr-pipeline`` command line: one module per command group, each parsing flags into one
config and calling one function (the work lives in the modules it calls). Options every command
shares (``--address``, ``--s3-endpoint-url``, the exit codes) are defined once, in
:mod:`pipeline.cli.options`."""

from __future__ import annotations

import click

from pipeline.cli.demo import demo
from pipeline.cli.evaluate import evaluate
from pipeline.cli.models import models
from pipeline.cli.report import report
from pipeline.cli.score import nightly, score
from pipeline.cli.train import train


@click.group()
def main() -> None:
    """DFR anomaly segmentation: train per-product-line models on Ray, score image archives."""


for _command in (train, models, demo, score, nightly, report, evaluate):
    main.add_command(_command)
