"""``dfr-pipeline models list`` and ``models promote``: the registry, its versions and why each
product line's LATEST holds (the promotion gate's records)."""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import promotion, registry
from pipeline.cli.options import EXIT_BAD_INPUT, echo_err, s3_endpoint_option, storage_options
from pipeline.progress import render_table
from pipeline.storage import StorageOptions


def describe(models_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """registry.describe plus each version's promotion decision (``promoted``/``held``/...)."""
    rows = registry.describe(models_uri, options)
    decisions: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        line = row["product_line"]
        if line not in decisions:
            decisions[line] = promotion.decisions_by_version(models_uri, line, options)
        record = decisions[line].get(row["version"])
        if record is None:
            row["decision"] = None
        else:
            verdict = "promoted" if record["promote"] else "held"
            row["decision"] = f"{verdict} ({record['basis']})"
    return rows


def why_latest(
    models_uri: str, rows: list[dict[str, Any]], options: StorageOptions | None = None
) -> dict[str, str]:
    """{line: why its LATEST holds}: the decision record that made it LATEST, and any newer
    versions the gate held back."""
    out = {}
    for line in sorted({r["product_line"] for r in rows}):
        latest = registry.latest_version(models_uri, line, options)
        if latest is None:
            continue
        history = promotion.history(models_uri, line, options)
        made = [r for r in history if r["version"] == latest and r["promote"]]
        why = made[-1]["reason"] if made else "no decision record (published before the gate)"
        held = _held_since(history, latest, made[-1] if made else None)
        if held:
            why += f"; newer versions held back: {', '.join(held)}"
        out[line] = f"{latest}: {why}"
    return out


def _held_since(
    history: list[dict[str, Any]], latest: str, made: dict[str, Any] | None
) -> list[str]:
    """Versions whose last decision held them back after LATEST was made: ordered by the
    decisions' times (microseconds), not by version names, whose timestamps have whole seconds
    (two versions of one second order by their random suffixes). Without a record for LATEST
    (published before the gate), the versions named after it."""
    last = {r["version"]: r for r in history}  # history is oldest first
    return [
        version
        for version, r in last.items()
        if not r["promote"]
        and version != latest
        and (r["decided_at"] > made["decided_at"] if made else version > latest)
    ]


@click.group("models")
def models() -> None:
    """Inspect the model registry."""


MODEL_HEADERS = (
    "product", "version", "latest", "created", "backbone", "size", "images",
    "img thr", "px thr", "img AUROC", "px AUROC", "PRO", "decision",
)  # fmt: skip


def _size(size: Any) -> Any:
    """A model's input size as the `--image-size` flag spells it: N, or HxW for non-square."""
    if isinstance(size, list | tuple):
        return f"{size[0]}x{size[1]}"
    return size


def _model_row(d: dict[str, Any]) -> tuple:
    m = d["metrics"]
    return (
        d["product_line"], d["version"], d["latest"], d["created_at"], d["backbone"],
        _size(d["image_size"]), d["train_images"], d["image_threshold"], d["pixel_threshold"],
        m.get("image_auroc"), m.get("pixel_auroc"), m.get("pro"), d.get("decision"),
    )  # fmt: skip


@models.command("list")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@s3_endpoint_option
def list_models(models_uri: str, s3_endpoint_url: str | None) -> None:
    """Product lines, versions, dates, thresholds and metrics in a registry."""
    try:
        rows = describe(models_uri, storage_options(s3_endpoint_url))
    except (ValueError, PermissionError) as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    if not rows:
        click.echo(f"no models under {models_uri}")
        return
    click.echo(render_table(MODEL_HEADERS, [_model_row(d) for d in rows]))
    reasons = why_latest(models_uri, rows, storage_options(s3_endpoint_url))
    if reasons:
        click.echo("")  # a blank line ends the table (scripts parse it)
    for line, why in reasons.items():
        click.echo(f"LATEST {line} {why}")


@models.command("promote")
@click.argument("product_line")
@click.argument("version")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@click.option("--reason", default=None, help="Why (stored in the decision record).")
@s3_endpoint_option
def promote_command(
    product_line: str, version: str, models_uri: str, reason: str | None,
    s3_endpoint_url: str | None,
) -> None:  # fmt: skip
    """Make VERSION the LATEST of PRODUCT_LINE by hand, overriding the promotion gate."""
    try:
        result = promotion.promote(
            models_uri, product_line, version, reason, storage_options(s3_endpoint_url)
        )
    except (ValueError, FileNotFoundError) as exc:
        echo_err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"{product_line}: LATEST is now {version} ({result.reason})")
