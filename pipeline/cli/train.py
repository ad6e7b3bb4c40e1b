"""``dfr-pipeline train``: flags -> TrainJobConfig -> run_train_job, and the results table."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from dfr_core.backbones import list_backbones
from pipeline.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    address_option,
    echo_err,
    s3_endpoint_option,
    split_names,
    storage_options,
)
from pipeline.manifest import ManifestError
from pipeline.model_options import OPTIONS, parse_cell, parse_image_size
from pipeline.progress import render_table
from pipeline.train_job import OK, TrainJobConfig, TrainJobResult, run_train_job


def _parse_model_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return parse_cell(param.name, value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def model_option_flags(func: Callable) -> Callable:
    """One --flag per model option (pipeline.model_options.OPTIONS), parsed like the manifest's
    cells; unset flags are None (the preset or dfr_core default applies)."""
    for option in reversed(OPTIONS):
        flag = "--" + option.name.replace("_", "-")
        func = click.option(
            flag, option.name, default=None, callback=_parse_model_option,
            help=f"{option.help[0].upper()}{option.help[1:]} (lines without an override).",
        )(func)  # fmt: skip
    return func


RESULT_HEADERS = (
    "product", "status", "images", "latent d", "img thr", "px thr",
    "img AUROC", "px AUROC", "PRO", "wall s", "version",
)  # fmt: skip


def format_results(result: TrainJobResult) -> str:
    """The final table, then one line per failed product line with its error."""
    rows = []
    for r in result.results:
        metrics = r.metrics
        rows.append(
            (
                r.product_line, r.status, r.train_images, r.latent_dim,
                r.image_threshold, r.pixel_threshold, metrics.get("image_auroc"),
                metrics.get("pixel_auroc"), metrics.get("pro"), r.wall_seconds,
                r.version,
            )
        )  # fmt: skip
    text = render_table(RESULT_HEADERS, rows)
    errors = [f"FAILED {r.product_line}: {r.error}" for r in result.results if r.error]
    held = [
        f"NOT PROMOTED {r.product_line} {r.version}: {r.promotion}"
        for r in result.results
        if r.status == OK and r.promoted is False
    ]
    return "\n".join([text, *errors, *held])


def _parse_image_size(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    size, error = parse_image_size(value)
    if error:
        raise click.BadParameter(error)
    return size


@click.command("train")
@click.option(
    "--products",
    "manifest_uri",
    required=True,
    metavar="URI",
    help="Manifest CSV (local path or s3://).",
)
@click.option(
    "--models-uri",
    required=True,
    metavar="URI",
    help="Model registry root: a path, file:// or s3://bucket/prefix.",
)
@click.option(
    "--backbone",
    type=click.Choice(list_backbones()),
    default=None,
    help="Backbone for lines without a manifest override [default: mobilenet_v2].",
)
@click.option(
    "--weights",
    "weights_uri",
    metavar="URI",
    default=None,
    help="Backbone weights file (path or s3://) instead of the offline package.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Training epochs for lines without an override [default: 30].",
)
@click.option(
    "--image-size",
    default=None,
    callback=_parse_image_size,
    metavar="N|HxW",
    help="Model input size N or HxW (e.g. 640x256), multiples of 32 [default: 256]; "
    "a tiled model's input is its --tile.",
)
@address_option
@click.option(
    "--gpus-per-task",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs per product line (fractions share a GPU, e.g. 0.25).",
)
@click.option(
    "--cpus-per-task",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="CPUs per product line.",
)
@click.option(
    "--only",
    multiple=True,
    metavar="PRODUCT",
    help="Train only these product lines (repeat, or comma-separated).",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Retries of a product line after a transient storage error.",
)
@click.option(
    "--min-images",
    type=click.IntRange(min=4),
    default=4,
    show_default=True,
    help="Fewest training images a product line may have.",
)
@click.option(
    "--feedback",
    "feedback_uri",
    default=None,
    metavar="URI",
    help="QA feedback table (CSV/Parquet): normals join training, defects the evaluation set.",
)
@click.option(
    "--promotion-tolerance",
    type=click.FloatRange(min=0),
    default=0.02,
    show_default=True,
    help="How much worse than LATEST (absolute, per metric) a new version may be and still "
    "become LATEST.",
)
@s3_endpoint_option
@model_option_flags
def train(
    manifest_uri: str,
    models_uri: str,
    backbone: str | None,
    weights_uri: str | None,
    epochs: int | None,
    image_size: int | tuple[int, int] | None,
    address: str | None,
    gpus_per_task: float,
    cpus_per_task: float,
    only: tuple[str, ...],
    retries: int,
    min_images: int,
    feedback_uri: str | None,
    promotion_tolerance: float,
    s3_endpoint_url: str | None,
    **model_options: Any,
) -> None:
    """Train one model per product line of a manifest and publish them to the registry.

    A new version becomes LATEST only if it is not worse than the current LATEST on the line's
    evaluation set (the promotion gate, docs/operating.md)."""
    try:
        config = TrainJobConfig(
            manifest_uri=manifest_uri,
            models_uri=models_uri,
            backbone=backbone,
            weights_uri=weights_uri,
            epochs=epochs,
            image_size=image_size,
            address=address,
            gpus_per_task=gpus_per_task,
            cpus_per_task=cpus_per_task,
            only=split_names(only),
            retries=retries,
            min_train_images=min_images,
            feedback_uri=feedback_uri,
            promotion_tolerance=promotion_tolerance,
            storage=storage_options(s3_endpoint_url),
            model_options={k: v for k, v in model_options.items() if v is not None},
        )
        result = run_train_job(config, echo=echo_err)
    except (ManifestError, ValueError, FileNotFoundError, ConnectionError) as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    click.echo(format_results(result))
    click.echo(f"models: {models_uri}")
    if result.failed:
        sys.exit(EXIT_FAILED)
