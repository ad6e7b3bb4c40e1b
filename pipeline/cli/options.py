"""What every command shares: exit codes, option definitions and flag parsing, one each.
Torch-free (the scoring driver, ``python -m pipeline.cli.score``, imports it).

Exit codes of all ``dfr-pipeline`` commands: 0 done; 1 ran, but something failed (a product
line, the job); 2 nothing ran: bad input or flags (click uses 2 for usage errors too); 3 too
many error rows (score); 4 empty input (score); 5 another run holds the lease (score); 6 a
product line drifts (nightly).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from pipeline import storage
from pipeline.ray_runtime import ADDRESS_HELP
from pipeline.storage import StorageOptions

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TOO_MANY_ERRORS = 3
EXIT_EMPTY_INPUT = 4
EXIT_LEASE_HELD = 5
EXIT_DRIFT = 6

#: ``--address``, the same for every command that runs Ray (pipeline.ray_runtime says how).
address_option = click.option("--address", default=None, metavar="ADDRESS", help=ADDRESS_HELP)
#: ``--s3-endpoint-url``, the same for every command that reads or writes storage.
s3_endpoint_option = click.option(
    "--s3-endpoint-url",
    default=None,
    metavar="URL",
    help="S3-compatible endpoint (MinIO, Ceph); default from DFR_S3_ENDPOINT_URL/AWS_*.",
)


class CommandGroup(click.Group):
    """The ``dfr-pipeline`` group: a storage client failure that no command handles (botocore's
    missing credentials, an endpoint that does not answer) is one ``error:`` line and exit 1,
    not a traceback (storage.client_failure)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = storage.client_failure(exc)
            if message is None:
                raise
            echo_err(f"error: {message}")
            sys.exit(EXIT_FAILED)


def echo_err(text: str) -> None:
    click.echo(text, err=True)


def storage_options(s3_endpoint_url: str | None) -> StorageOptions:
    """--s3-endpoint-url wins; otherwise the environment (DFR_S3_ENDPOINT_URL, AWS_*)."""
    env = StorageOptions.from_env()
    if s3_endpoint_url:
        return StorageOptions(s3_endpoint_url=s3_endpoint_url, anon=env.anon)
    return env


def split_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable name option: `--only a --only b` and `--only a,b` both work."""
    return tuple(name.strip() for v in values for name in v.split(",") if name.strip())
