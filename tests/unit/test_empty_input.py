"""An input that lists no image is an error of its own (exit 4) unless it is allowed.

A nightly job whose upstream export broke must not report success. No Ray is needed: the
listing is resolved, and refused (or, with --allow-empty, committed as an empty run), before any
Ray work starts.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import outputs
from pipeline.cli.options import EXIT_EMPTY_INPUT
from pipeline.cli.score import nightly, score
from pipeline.nightly_config import load_config

DATE = "2024-05-01"


def _inputs(tmp_path: Path) -> dict[str, str]:
    header_only = tmp_path / "listing.csv"
    header_only.write_text("image_uri,product_line\n")
    empty_dir = tmp_path / "archive"
    empty_dir.mkdir()
    other_line = tmp_path / "other.csv"
    other_line.write_text(f"image_uri,product_line\n{tmp_path}/x.png,wood\n")
    return {"listing": str(header_only), "prefix": str(empty_dir), "filtered": str(other_line)}


def _args(tmp_path: Path, input_uri: str, *extra: str) -> list[str]:
    return [
        *("--models-uri", str(tmp_path / "models"), "--input", input_uri),
        *("--output", str(tmp_path / "out"), "--run-date", DATE, "--quiet", *extra),
    ]


@pytest.mark.parametrize("kind", ["listing", "prefix", "filtered"])
def test_empty_input_exits_4_naming_the_input(tmp_path, kind):
    input_uri = _inputs(tmp_path)[kind]
    extra = ("--products", "metal_plate") if kind == "filtered" else ()
    result = CliRunner().invoke(score, _args(tmp_path, input_uri, *extra))
    assert result.exit_code == EXIT_EMPTY_INPUT == 4, result.output
    assert f"input {input_uri} lists no images" in result.output
    assert "--allow-empty" in result.output
    if kind == "filtered":
        assert "metal_plate" in result.output
    assert not (tmp_path / "out").exists()  # nothing written, not even a lease


def test_allow_empty_commits_an_empty_run_and_leaves_nothing_else(tmp_path):
    input_uri = _inputs(tmp_path)["listing"]
    result = CliRunner().invoke(score, _args(tmp_path, input_uri, "--allow-empty"))
    assert result.exit_code == 0, result.output
    assert "0 listed" in result.output
    runs = outputs.committed_runs(str(tmp_path / "out"))
    assert len(runs) == 1 and runs[0]["counts"]["rows"] == 0
    tree = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert tree == ["runs", f"runs/{runs[0]['run_id']}.json"]  # no lease, no staging left


def test_nightly_config_can_allow_empty(tmp_path):
    input_uri = _inputs(tmp_path)["listing"]
    config = tmp_path / "nightly.yaml"
    body = f"""
        models_uri: {tmp_path}/models
        input_uri: {input_uri}
        output_uri: {tmp_path}/out
        run_date: {DATE}
        """
    config.write_text(textwrap.dedent(body))
    assert not load_config(config).allow_empty
    result = CliRunner().invoke(nightly, ["--config", str(config), "--quiet"])
    assert result.exit_code == 4, result.output
    config.write_text(textwrap.dedent(body) + "allow_empty: true\n")
    assert load_config(config).allow_empty
    result = CliRunner().invoke(nightly, ["--config", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
