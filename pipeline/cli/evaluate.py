"""``dfr-pipeline evaluate``: score a labelled set with one published model version.

Prints image AUROC, pixel AUROC and PRO (when masks exist), TPR at 1 % image FPR and what the
calibrated thresholds give (realised image FPR and recall), and stores the result as an
evaluation record beside the version (``{models}/{line}/_evaluations/{version}/``).
Exit codes: 0 evaluated; 2 bad input (no such line/version, unusable labelled set).
"""

from __future__ import annotations

import json
import sys

import click

from dfr_core.artifact import ArtifactError
from dfr_core.backbones import WeightsNotFoundError
from dfr_core.device import pick_device
from pipeline import evaluation
from pipeline.cli.options import EXIT_BAD_INPUT, echo_err, s3_endpoint_option, storage_options
from pipeline.mvtec_remote import LabelledSetError
from pipeline.progress import render_table
from pipeline.score_job import DEFAULT_CACHE_DIR

SHOWN = (
    ("image AUROC", "image_auroc"),
    ("pixel AUROC", "pixel_auroc"),
    ("PRO", "pro"),
    ("TPR @ 1% FPR", "tpr_at_1pct_fpr"),
    ("realised image FPR", "realised_image_fpr"),
    ("realised image recall", "realised_image_recall"),
    ("pixel F1", "f1"),
    ("images", "n_images"),
    ("defective", "n_anomalous"),
    ("skipped", "skipped_images"),
)


@click.command("evaluate")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@click.option("--product", "product_line", required=True, help="Product line.")
@click.option(
    "--data",
    "data_uri",
    required=True,
    metavar="URI",
    help="MVTec-layout folder, or a CSV/Parquet listing: image_uri, label (normal|defect), "
    "optional mask_uri and product_line.",
)
@click.option("--version", default=None, help="Model version [default: LATEST].")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.option("--cache-dir", default=DEFAULT_CACHE_DIR, show_default=True)
@s3_endpoint_option
def evaluate(
    models_uri: str, product_line: str, data_uri: str, version: str | None, as_json: bool,
    cache_dir: str, s3_endpoint_url: str | None,
) -> None:  # fmt: skip
    """Evaluate a model version on a labelled set and store the result beside it."""
    options = storage_options(s3_endpoint_url)
    try:
        version = version or evaluation.line_has_model(models_uri, product_line, options)
        samples = evaluation.list_eval_samples(data_uri, product_line, options)
        loaded = evaluation.load_version(models_uri, product_line, version, cache_dir, options)
        geometry = loaded.metadata.model_config
        lset = evaluation.load_eval_set(samples, geometry, options)
        metrics = evaluation.evaluate_model(
            loaded.model, loaded.calibration, lset, pick_device(), curves=False
        )
    except (LabelledSetError, ArtifactError, WeightsNotFoundError, ValueError) as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    except FileNotFoundError as exc:
        echo_err(f"error: not found: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    uri = evaluation.write_evaluation(models_uri, product_line, version, data_uri, metrics, options)
    if as_json:
        record = {"product_line": product_line, "version": version, "data_uri": data_uri,
                  "record_uri": uri, "metrics": metrics}  # fmt: skip
        click.echo(json.dumps(record, indent=2, sort_keys=True, default=float))
        return
    rows = [(label, metrics.get(key)) for label, key in SHOWN]
    click.echo(f"{product_line} {version} on {data_uri}")
    click.echo(render_table(("metric", "value"), rows))
    click.echo(f"record: {uri}")
