"""The ``dfr-pipeline`` group: every command module, attached (importing this loads them all,
torch included; ``pipeline.cli.score`` alone does not)."""

from __future__ import annotations

import click

from pipeline.cli.demo import demo
from pipeline.cli.evaluate import evaluate
from pipeline.cli.models import models
from pipeline.cli.options import CommandGroup
from pipeline.cli.report import report
from pipeline.cli.score import nightly, score
from pipeline.cli.train import train


@click.group(cls=CommandGroup)
def main() -> None:
    """DFR anomaly segmentation: train per-product-line models on Ray, score image archives."""


for _command in (train, models, demo, score, nightly, report, evaluate):
    main.add_command(_command)
