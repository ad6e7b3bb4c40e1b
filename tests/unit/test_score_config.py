"""Scoring configuration: flag parsing, validation and the nightly YAML."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
import pytest

from pipeline.cli.score import parse_actors
from pipeline.nightly_config import NightlyConfigError, load_config, resolve_run_date
from pipeline.score_job import ScoreJobConfig

BASE = {"models_uri": "/m", "input_uri": "/i", "output_uri": "/o", "run_date": "2024-05-01"}


def test_parse_actors():
    assert parse_actors("3") == (3, 3) and parse_actors("1:4") == (1, 4)
    for bad in ("0", "4:1", "x", "1:"):
        with pytest.raises(click.BadParameter):
            parse_actors(bad)


@pytest.mark.parametrize(
    "change",
    [
        {"run_date": "01/05/2024"},
        {"run_id": "a/b"},
        {"products": ("ok", "../no")},
        {"masks": "some"},
        {"batch_size": 0},
        {"min_actors": 3, "max_actors": 2},
        {"decode_cpus": 0},
        {"max_error_fraction": 1.5},
        {"stop_after_shards": 0},
    ],
)
def test_score_config_rejects(change):
    with pytest.raises(ValueError):
        ScoreJobConfig(**{**BASE, **change})


def test_resolve_run_date():
    today = dt.date(2024, 5, 2)
    assert resolve_run_date(None, today) == "2024-05-02"
    assert resolve_run_date("today", today) == "2024-05-02"
    assert resolve_run_date("yesterday", today) == "2024-05-01"
    assert resolve_run_date(dt.date(2024, 1, 3), today) == "2024-01-03"
    with pytest.raises(ValueError):
        resolve_run_date("tomorrow-ish", today)


def test_nightly_yaml(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text(
        "models_uri: s3://m\ninput_uri: s3://in/{run_date}.parquet\noutput_uri: s3://out\n"
        "run_date: 2024-05-01\nproducts: [a, b]\nmin_actors: 1\nmax_actors: 4\n"
        "s3_endpoint_url: http://127.0.0.1:9000\n"
    )
    config = load_config(path)
    assert config.input_uri == "s3://in/2024-05-01.parquet" and config.run_date == "2024-05-01"
    assert config.products == ("a", "b") and (config.min_actors, config.max_actors) == (1, 4)
    assert config.storage.s3_endpoint_url == "http://127.0.0.1:9000"
    assert load_config(path, run_date="2024-06-01").input_uri == "s3://in/2024-06-01.parquet"
    path.write_text("models_uri: s3://m\ninput_uri: x\noutput_uri: y\nbogus: 1\n")
    with pytest.raises(NightlyConfigError, match="bogus"):
        load_config(path)
    path.write_text("models_uri: s3://m\nstop_after_shards: 1\n")
    with pytest.raises(NightlyConfigError, match="stop_after_shards"):
        load_config(path)


def test_example_nightly_yaml_loads():
    example = Path(__file__).resolve().parents[2] / "jobs" / "nightly.yaml"
    config = load_config(example, run_date="2024-05-01")
    assert config.input_uri == "s3://factory-archive/listings/2024-05-01.parquet"
    assert config.address == "auto" and config.masks == "anomalous"
