"""model.json is parsed once, into a typed ModelMetadata, and read by attribute everywhere.

The parser keeps the meaning of the version that wrote a file (format 1: image score = max of
the map), refuses what it cannot read with an ArtifactError naming the file and the key, and
is the only reader of model.json's keys in the product (the last tests check that, and that the
check can fail).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from dfr_core.artifact_meta import (
    FORMAT,
    FORMAT_VERSION,
    NO_CALIBRATION,
    REQUIRED_KEYS,
    ArtifactError,
    ModelMetadata,
    parse_metadata,
)
from dfr_core.calibrate import Calibration
from dfr_core.config import LEGACY_V1_MODEL_FIELDS, ModelConfig, to_dict

REPO = Path(__file__).resolve().parents[2]
LAYERS = ["features.3", "features.6"]
#: the calibration as save_model records it (dataclasses.asdict of a Calibration)
CALIBRATION = dataclasses.asdict(Calibration(0.7, 2.0, 0.005, 0.01, 6, "quantile", None, 1.5))


def _document(version: int = FORMAT_VERSION) -> dict[str, Any]:
    """A model.json as save_model writes it (format 2), or as version 1 wrote it."""
    config = to_dict(ModelConfig(image_size=128, layers=()))
    if version == 1:
        config = {k: v for k, v in config.items() if k not in LEGACY_V1_MODEL_FIELDS}
    return {
        "format": FORMAT,
        "format_version": version,
        "model_config": config,
        "backbone": {
            "name": "mobilenet_v2",
            "layers": LAYERS,
            "channels": 56,
            "weights_sha256": "ab" * 32,
            "weights_source": "package",
        },
        "latent_dim": 12,
        "calibration": dict(CALIBRATION),
        "training": {
            "train_images": 24,
            "val_images": 6,
            "epochs_run": 5,
            "best_epoch": 4,
            "best_loss": 0.25,
            "history": [{"epoch": 1, "train_loss": 1.0}],
            "holdout": {"early_stopping": ["a.png"], "calibration": ["b.png"]},
        },
        "metrics": {"image_auroc": 0.9, "n_images": 10, "curves": {"roc": {}}},
        "extra": {
            "weights_uri": "s3://bucket/w.pth",
            "created_at": "2024-04-30T12:00:00",
            "train_image_count": 24,
            "drift_reference": {"version": 1},
        },
        "versions": {},
        "files": {"head.pt": "cd" * 32},
    }


def test_format_2_is_typed() -> None:
    meta = parse_metadata(_document(), "m/model.json")
    assert isinstance(meta, ModelMetadata)
    assert meta.format_version == 2
    assert meta.model_config.image_size == 128
    assert meta.model_config.layers == tuple(LAYERS)  # [] meant "the layers recorded beside it"
    assert (meta.backbone.name, meta.backbone.layers) == ("mobilenet_v2", tuple(LAYERS))
    assert (meta.backbone.channels, meta.latent_dim) == (56, 12)
    assert meta.backbone.weights_sha256 == "ab" * 32
    assert meta.files == {"head.pt": "cd" * 32}
    assert meta.calibration is not None and meta.require_calibration() is meta.calibration
    assert (meta.calibration.image_threshold, meta.calibration.n_images) == (2.0, 6)
    assert meta.calibration.fields == CALIBRATION  # what Calibration(**fields) is built from
    assert (meta.training.epochs_run, meta.training.best_loss) == (5, 0.25)
    assert meta.training.holdout["calibration"] == ["b.png"]
    assert (meta.metrics.image_auroc, meta.metrics.n_images, meta.metrics.pro) == (0.9, 10, None)
    assert meta.metrics.evaluated
    assert meta.weights_uri == "s3://bucket/w.pth"
    assert (meta.created_at, meta.train_image_count) == ("2024-04-30T12:00:00", 24)
    assert meta.drift_reference == {"version": 1}


def test_format_1_keeps_its_meaning() -> None:
    """A version-1 file lacks the image-score fields: they get what version 1 meant."""
    meta = parse_metadata(_document(version=1), "old/model.json")
    assert meta.format_version == 1
    for name, value in LEGACY_V1_MODEL_FIELDS.items():
        assert getattr(meta.model_config, name) == value
    assert meta.model_config.layers == tuple(LAYERS)


def test_format_2_without_a_config_field_is_refused() -> None:
    doc = _document()
    del doc["model_config"]["image_score"]
    with pytest.raises(ArtifactError, match=r"format_version 2.*image_score"):
        parse_metadata(doc, "m/model.json")


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_a_missing_key_is_named(key: str) -> None:
    doc = _document()
    del doc[key]
    with pytest.raises(ArtifactError, match=f"m/model.json: missing key '{key}'"):
        parse_metadata(doc, "m/model.json")


def test_bad_values_are_refused_with_the_file() -> None:
    for change, message in (
        ({"format": "other"}, "not a dfr-pipeline-model config"),
        ({"format_version": FORMAT_VERSION + 1}, f"format_version {FORMAT_VERSION + 1} is newer"),
        ({"latent_dim": "twelve"}, "bad latent_dim 'twelve'"),
        ({"backbone": {"layers": LAYERS}}, "bad backbone"),
        ({"calibration": [1, 2]}, "bad calibration"),
        ({"files": ["head.pt"]}, "bad files"),
    ):
        with pytest.raises(ArtifactError, match=f"m/model.json: {message}"):
            parse_metadata({**_document(), **change}, "m/model.json")


def test_optional_sections_may_be_absent_or_odd() -> None:
    """Only what loading needs decides; the rest shows as absent (a dash in the report)."""
    doc = _document()
    for key in ("training", "metrics", "extra"):
        del doc[key]
    doc["calibration"] = None
    meta = parse_metadata(doc, "m/model.json")
    assert meta.calibration is None and not meta.metrics.evaluated
    assert meta.training.epochs_run is None and meta.weights_uri is None
    with pytest.raises(ArtifactError, match=re.escape(NO_CALIBRATION)):
        meta.require_calibration()
    odd = _document()
    odd["training"]["epochs_run"] = "five"
    odd["metrics"]["image_auroc"] = True
    meta = parse_metadata(odd, "m/model.json")
    assert meta.training.epochs_run is None and meta.metrics.image_auroc is None


def test_parsing_does_not_change_the_document() -> None:
    doc = _document()
    before = copy.deepcopy(doc)
    parse_metadata(doc, "m/model.json")
    assert doc == before


# --------------------------------------------------------------------------------------------
# model.json's keys are read only by the artifact modules

#: keys only model.json has (others, such as "files" or "metrics", also name run records and
#: result rows, so a check on them could not tell a model.json read from another)
MODEL_JSON_KEYS = frozenset(
    {
        "model_config",
        "calibration",
        "format_version",
        "training",
        "extra",
        "weights_sha256",
        "weights_uri",
        "drift_reference",
    }
)
ARTIFACT_MODULES = {"dfr_core/artifact.py", "dfr_core/artifact_meta.py"}
PRODUCT_DIRS = ("dfr_core", "pipeline", "jobs", "benchmarks", "scripts")


def key_reads(source: str) -> list[tuple[int, str]]:
    """(line, key) of every ``x["key"]`` / ``x.get("key", ...)`` read of a model.json key."""
    found = []
    for node in ast.walk(ast.parse(source)):
        key: object = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if isinstance(node.slice, ast.Constant):
                key = node.slice.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr == "get" and node.args and isinstance(node.args[0], ast.Constant):
                key = node.args[0].value
        if key in MODEL_JSON_KEYS:
            found.append((node.lineno, str(key)))
    return found


def test_the_key_check_can_fail() -> None:
    source = 'size = meta["model_config"]["image_size"]\nuri = (m.get("extra") or {}).get("x")\n'
    assert key_reads(source) == [(1, "model_config"), (2, "extra")]
    assert key_reads('row = {"calibration": uris}\nmeta.calibration\n') == []  # writes, attributes


def test_no_product_module_reads_model_json_keys() -> None:
    offenders = []
    for folder in PRODUCT_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if rel in ARTIFACT_MODULES:
                continue
            offenders += [f"{rel}:{line}: {key}" for line, key in key_reads(path.read_text())]
    assert not offenders, "read model.json through dfr_core.artifact_meta.ModelMetadata:\n" + (
        "\n".join(offenders)
    )


def test_the_parser_is_torch_free() -> None:
    """The scoring driver parses model.json for every line without importing torch."""
    import subprocess

    code = "import sys, dfr_core.artifact_meta; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
