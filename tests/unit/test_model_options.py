"""Model options per manifest row and as train flags: parsed, validated with line and column,
resolved with precedence cell > flag > preset > default, and saved in the task's configs."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dfr_core.config import PRESETS, CalibrationConfig, ModelConfig
from pipeline.cli import main
from pipeline.manifest import ManifestError, parse_manifest
from pipeline.model_options import build_configs, parse_cell
from pipeline.storage import StorageOptions
from pipeline.train_job import TrainJobConfig, build_tasks

HEADER = (
    "product_line,train_uri,layers,smoothing_sigma,image_score,global_weight,preset,image_fpr\n"
)


def _rows(body: str):
    return parse_manifest(HEADER + body, "m.csv", base_dir="/data")


def test_cells_are_typed_and_stored_on_the_row():
    (row,) = _rows("a,imgs,features.1+features.6,8,max,0.5,,0.02\n")
    assert row.options == {
        "layers": ("features.1", "features.6"),
        "smoothing_sigma": 8.0,
        "image_score": "max",
        "global_weight": 0.5,
        "image_fpr": 0.02,
    }
    assert row.to_dict()["options"]["layers"] == ("features.1", "features.6")


def test_bad_cells_are_reported_with_line_and_column():
    with pytest.raises(ManifestError) as info:
        _rows("a,imgs,,abc,median,-1,nope,2\n")
    problems = {(p.line, p.column) for p in info.value.problems}
    assert problems == {
        (2, "smoothing_sigma"),
        (2, "image_score"),
        (2, "global_weight"),
        (2, "preset"),
        (2, "image_fpr"),
    }
    text = str(info.value)
    assert "'abc' is not a number" in text and "'median' is not one of max, topk_mean" in text
    assert "unknown preset 'nope'" in text and "image_fpr must be in (0, 1)" in text


def _job(**options) -> TrainJobConfig:
    return TrainJobConfig(manifest_uri="m.csv", models_uri="/models", model_options=options)


def test_combination_errors_name_line_and_column():
    rows = _rows("a,imgs,features.99,,,,,\nb,imgs,,,,,,\n")
    with pytest.raises(ManifestError) as info:
        build_tasks(_job(), rows, StorageOptions())
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (2, "layers")
    assert "unknown layer(s) ['features.99'] for backbone 'mobilenet_v2'" in problem.message
    rows = parse_manifest(
        "product_line,train_uri,score_norm\na,imgs,none\n", "m.csv", base_dir="/data"
    )
    with pytest.raises(ManifestError) as info:
        build_tasks(_job(), rows, StorageOptions())
    assert {(p.line, p.column) for p in info.value.problems} == {(2, "score_norm")}


def test_precedence_cell_over_flag_over_preset_over_default():
    rows = _rows("a,imgs,,2,,,,\nb,imgs,,,,,,\n")
    a, b = build_tasks(_job(smoothing_sigma=6.0, image_fpr=0.05), rows, StorageOptions())
    assert a.model.smoothing_sigma == 2.0 and b.model.smoothing_sigma == 6.0
    assert a.calibration.image_fpr == b.calibration.image_fpr == 0.05
    assert a.model.image_score == ModelConfig().image_score
    (paper,) = build_tasks(_job(preset="paper"), _rows("p,imgs,,,,,,\n"), StorageOptions())
    assert paper.model == ModelConfig(**PRESETS["paper"])
    (mixed,) = build_tasks(_job(preset="paper"), _rows("p,imgs,,3,,,,\n"), StorageOptions())
    assert mixed.model.smoothing_sigma == 3.0 and mixed.model.backbone == "vgg19"


def test_paper_preset_is_the_published_method():
    model = build_configs({"preset": "paper"}, {}, {}, {}, CalibrationConfig()).model
    assert model.backbone == "vgg19" and model.layers == (
        "relu1_1", "relu1_2", "relu2_1", "relu2_2", "relu3_1", "relu3_2", "relu3_3",
        "relu3_4", "relu4_1", "relu4_2", "relu4_3", "relu4_4",
    )  # fmt: skip
    assert (model.feature_norm, model.smoothing_sigma, model.image_score) == ("none", 0.0, "max")
    assert (model.score_norm, model.global_weight) == ("none", 0.0)


def test_parse_cell_uses_the_configs_own_rules():
    assert parse_cell("layers", "a b;c") == ("a", "b", "c")
    with pytest.raises(ValueError, match="topk_fraction must be in"):
        parse_cell("topk_fraction", "0")


def test_train_flags_are_validated(tmp_path):
    result = CliRunner().invoke(
        main,
        ["train", "--products", "x.csv", "--models-uri", str(tmp_path), "--image-score", "mean"],
    )
    assert result.exit_code == 2 and "'mean' is not one of max, topk_mean" in result.output
    result = CliRunner().invoke(
        main,
        ["train", "--products", "x.csv", "--models-uri", str(tmp_path), "--score-norm", "none"],
    )
    assert result.exit_code != 0 and "global_weight" in result.output
