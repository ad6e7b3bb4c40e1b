"""Flag parsing shared by the click commands (train, models, report): one definition each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from pipeline.model_options import OPTIONS, parse_cell
from pipeline.storage import StorageOptions


def storage_options(s3_endpoint_url: str | None) -> StorageOptions:
    """--s3-endpoint-url wins; otherwise the environment (DFR_S3_ENDPOINT_URL, AWS_*)."""
    env = StorageOptions.from_env()
    if s3_endpoint_url:
        return StorageOptions(s3_endpoint_url=s3_endpoint_url, anon=env.anon)
    return env


def split_names(values: tuple[str, ...]) -> tuple[str, ...]:
    """A repeatable name option: `--only a --only b` and `--only a,b` both work."""
    return tuple(name.strip() for v in values for name in v.split(",") if name.strip())


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
