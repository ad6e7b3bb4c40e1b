"""The nightly scoring config: a YAML file of ScoreJobConfig fields -> one ScoreJobConfig.

The YAML holds ScoreJobConfig fields (same names), plus ``run_date`` (``today``, ``yesterday`` or
YYYY-MM-DD, UTC) and ``{run_date}`` placeholders in ``input_uri``/``output_uri``, so one file
serves every night. The date is fixed once, here; run_score_job then pins each product line's
LATEST model once, scores, and writes ``{output}/runs/{run_id}.json`` last as the commit marker.
Starting the same night again (after a crash, or by mistake) resumes or does nothing.

Lives in the product package (not ``jobs/``): ``dfr-pipeline nightly`` and ``jobs.submit`` read
it, and nothing imports ``jobs/``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import yaml

from pipeline.score_job import ScoreJobConfig
from pipeline.storage import StorageOptions

#: YAML keys that are not ScoreJobConfig fields of the same name.
SPECIAL_KEYS = ("run_date", "s3_endpoint_url")
#: ScoreJobConfig fields a nightly file may not set (internal or test-only knobs).
FORBIDDEN_KEYS = ("storage", "stop_after_shards")


class NightlyConfigError(ValueError):
    """The nightly YAML is unreadable or names unknown settings."""


def resolve_run_date(value: str | dt.date | None, today: dt.date | None = None) -> str:
    """``today`` (default), ``yesterday`` or an explicit date -> YYYY-MM-DD (UTC)."""
    today = today or dt.datetime.now(dt.UTC).date()
    if value is None or value == "today":
        return today.isoformat()
    if value == "yesterday":
        return (today - dt.timedelta(days=1)).isoformat()
    if isinstance(value, dt.date):  # YAML parses an unquoted 2024-05-01 as a date
        return value.isoformat()
    return dt.date.fromisoformat(str(value)).isoformat()


def load_config(
    path: str | Path, run_date: str | None = None, quiet: bool = False
) -> ScoreJobConfig:
    """Read the nightly YAML into a ScoreJobConfig; ``run_date`` overrides the file's."""
    try:
        data: Any = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise NightlyConfigError(f"{path}: {exc}") from exc
    if not isinstance(data, dict):
        raise NightlyConfigError(f"{path}: expected a mapping of settings")
    fields = {f.name for f in dataclasses.fields(ScoreJobConfig)} - set(FORBIDDEN_KEYS)
    unknown = sorted(set(data) - fields - set(SPECIAL_KEYS))
    if unknown:
        raise NightlyConfigError(f"{path}: unknown settings {unknown}; valid: {sorted(fields)}")
    values = {k: v for k, v in data.items() if k in fields}
    date = resolve_run_date(run_date or data.get("run_date"))
    for key in ("input_uri", "output_uri"):
        if isinstance(values.get(key), str):
            values[key] = values[key].replace("{run_date}", date)
    values["run_date"] = date
    values["products"] = tuple(values.get("products") or ())
    values["quiet"] = quiet or bool(values.get("quiet", False))
    if data.get("s3_endpoint_url"):
        values["storage"] = StorageOptions(s3_endpoint_url=str(data["s3_endpoint_url"]))
    try:
        return ScoreJobConfig(**values)
    except TypeError as exc:  # a required field missing
        raise NightlyConfigError(f"{path}: {exc}") from exc
