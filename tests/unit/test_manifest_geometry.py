"""Geometry columns and flags (issue 12): image_size N or HxW, tile, tile_overlap, tile_scale,
max_tiles; each problem named with its line and column, before anything trains."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from pipeline.manifest import ManifestError, parse_manifest
from pipeline.storage import StorageOptions
from pipeline.train_job import TrainJobConfig, build_tasks, geometry_problems

HEADER = "product_line,train_uri,image_size,tile,tile_overlap,tile_scale,max_tiles\n"


def _rows(body: str, base_dir: str = "/data"):
    return parse_manifest(HEADER + body, "m.csv", base_dir=base_dir)


def _job(**options) -> TrainJobConfig:
    return TrainJobConfig(manifest_uri="m.csv", models_uri="/models", model_options=options)


def test_geometry_cells_reach_the_model_config():
    rows = _rows("a,imgs,640x256,,,,\nb,imgs,,256,32,0.5,20\n")
    assert rows[0].image_size == (640, 256) and rows[1].options["tile"] == 256
    a, b = build_tasks(_job(), rows, StorageOptions())
    assert a.model.input_hw == (640, 256) and a.model.tile is None
    assert (b.model.tile, b.model.tile_overlap, b.model.tile_scale, b.model.max_tiles) == (
        256, 32, 0.5, 20,
    )  # fmt: skip
    assert b.model.input_hw == (256, 256)


def test_bad_geometry_cells_name_line_and_column():
    with pytest.raises(ManifestError) as info:
        _rows("a,imgs,640x250,,,,\nb,imgs,,100,,,\nc,imgs,,64,,0,0\nd,imgs,axb,,,,\n")
    got = {(p.line, p.column): p.message for p in info.value.problems}
    assert "multiple of 32" in got[(2, "image_size")]
    assert "tile must be a multiple of 32" in got[(3, "tile")]
    assert "tile_scale must be in (0, 16]" in got[(4, "tile_scale")]
    assert "max_tiles must be >= 1" in got[(4, "max_tiles")]
    assert "'axb' is not a size N or HxW" in got[(5, "image_size")]


def test_overlap_not_below_the_tile_is_a_row_problem():
    rows = _rows("a,imgs,,64,64,,\n")
    with pytest.raises(ManifestError) as info:
        build_tasks(_job(), rows, StorageOptions())
    (problem,) = info.value.problems
    assert (problem.line, problem.column) == (2, "tile_overlap")
    assert "tile_overlap must be >= 0 and < tile (64), got 64" in problem.message


def test_a_tile_larger_than_the_training_images_names_the_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((40, 90, 3), dtype=np.uint8)).save(folder / "a.png")
    rows = _rows("a,imgs,,64,,,\nb,imgs,,32,,,\n", base_dir=str(tmp_path))
    small, fits = build_tasks(_job(), rows, StorageOptions())
    (problem,) = geometry_problems(small, StorageOptions())
    assert (problem.line, problem.column) == (2, "tile")
    assert "image 40x90 is smaller than the 64 px tile" in problem.message
    assert geometry_problems(fits, StorageOptions()) == []


def test_image_size_flag_accepts_hxw_and_rejects_bad_sizes(tmp_path):
    runner = CliRunner()
    base = ["train", "--products", str(tmp_path / "none.csv"), "--models-uri", str(tmp_path)]
    bad = runner.invoke(main, [*base, "--image-size", "640x250"])
    assert bad.exit_code == 2 and "multiple of 32" in bad.output
    bad = runner.invoke(main, [*base, "--tile", "64", "--tile-overlap", "64"])
    assert bad.exit_code != 0 and "tile_overlap must be >= 0 and < tile (64)" in bad.output
    ok = runner.invoke(main, [*base, "--image-size", "640x256", "--tile-scale", "0.5"])
    assert "manifest file not found" in ok.output  # flags accepted; the manifest is missing


def test_models_list_spells_sizes_as_the_flag_does():
    from pipeline.cli.models import _size

    assert (_size(256), _size((640, 256)), _size([640, 256]), _size(None)) == (
        256,
        "640x256",
        "640x256",
        None,
    )
