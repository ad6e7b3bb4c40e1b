"""``dfr-pipeline models promote`` and the promotion columns of ``models list``.

A plain click command that pipeline/cli.py attaches to its ``models`` group (this module does
not import pipeline.cli, so there is no cycle).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import promotion, registry
from pipeline.cli_options import storage_options
from pipeline.storage import StorageOptions

EXIT_BAD_INPUT = 2


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
        held = [r["version"] for r in history if not r["promote"] and r["version"] > latest]
        if held:
            why += f"; newer versions held back: {', '.join(held)}"
        out[line] = f"{latest}: {why}"
    return out


@click.command("promote")
@click.argument("product_line")
@click.argument("version")
@click.option("--models-uri", required=True, metavar="URI", help="Model registry root.")
@click.option("--reason", default=None, help="Why (stored in the decision record).")
@click.option("--s3-endpoint-url", default=None, metavar="URL", help="S3-compatible endpoint.")
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
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    click.echo(f"{product_line}: LATEST is now {version} ({result.reason})")
