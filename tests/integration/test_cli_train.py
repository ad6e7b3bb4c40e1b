"""The `dfr-pipeline` commands: train (S3 registry), models list, exit codes, the demo steps,
and one run of the real installed entry point in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline import registry, storage
from pipeline.cli import main
from pipeline.cli.options import EXIT_BAD_INPUT, EXIT_FAILED
from pipeline.demo import DemoConfig, run_demo
from pipeline.demo.synthetic import SyntheticSpec, write_mvtec_dataset

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
FLAGS = ["--image-size", "64", "--epochs", "2", "--cpus-per-task", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-data")
    spec = SyntheticSpec(
        product_lines=("wood_panel", "woven_fabric"), n_train=6, n_test_good=2, n_test_defect=2,
        size=64,
    )  # fmt: skip
    write_mvtec_dataset(root, spec)
    return root


def _upload(local: Path, uri: str) -> str:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.write_bytes_atomic(
                storage.join_uri(uri, *path.relative_to(local).parts), path.read_bytes()
            )
    return uri


def test_train_and_list_on_s3(ray_session: object, s3_bucket: str, s3_server, data: Path):
    wood = _upload(data / "wood_panel", f"{s3_bucket}/wood_panel")
    fabric = _upload(data / "woven_fabric" / "train", f"{s3_bucket}/fabric")
    manifest = data / "manifest-s3.csv"
    manifest.write_text(
        "product_line,train_uri,test_uri,epochs\n"
        f"wood_panel,{wood}/train/good,{wood},\n"
        f"woven_fabric,{fabric},,1\n"
    )
    models = f"{s3_bucket}/models"
    args = ["train", "--products", str(manifest), "--models-uri", models, *FLAGS]
    args += ["--s3-endpoint-url", s3_server.endpoint_url]

    result = CliRunner().invoke(main, args)

    assert result.exit_code == 0, result.output
    table = result.stdout.splitlines()
    assert table[0].split() == [
        "product", "status", "images", "latent", "d", "img", "thr", "px", "thr", "img",
        "AUROC", "px", "AUROC", "PRO", "wall", "s", "version",
    ]  # fmt: skip
    wood_v = registry.latest_version(models, "wood_panel")
    fabric_v = registry.latest_version(models, "woven_fabric")
    # 6 normal images: 1 early-stops, a disjoint 1 calibrates (issue 10's honest split), 4 train
    assert table[2].split()[:3] == ["wood_panel", "ok", "4"]
    assert table[2].split()[-1] == wood_v
    assert table[3].split()[:3] == ["woven_fabric", "ok", "4"]
    assert table[3].split()[6:9] == ["-", "-", "-"]  # no test_uri: no metrics
    assert "wood_panel    epoch 2/2" in result.stderr
    assert "woven_fabric  epoch 1/1" in result.stderr
    meta = registry.read_version_metadata(models, "woven_fabric", fabric_v)
    assert meta["training"]["epochs_run"] == 1  # the manifest override beat --epochs 2

    listed = CliRunner().invoke(main, ["models", "list", "--models-uri", models])
    assert listed.exit_code == 0, listed.output
    table, reasons = listed.stdout.split("\n\n")
    rows = [line.split() for line in table.splitlines()[2:]]
    assert f"LATEST wood_panel {wood_v}: promoted: first version of the line" in reasons
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("wood_panel", wood_v, "yes"),
        ("woven_fabric", fabric_v, "yes"),
    ]


def test_bad_manifest_exit_code_and_message(ray_session: object, tmp_path: Path, data: Path):
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"product_line,train_uri,size\nwood/panel,{data / 'wood_panel' / 'train' / 'good'},\n"
    )
    models = tmp_path / "models"
    result = CliRunner().invoke(
        main, ["train", "--products", str(manifest), "--models-uri", str(models), *FLAGS]
    )
    assert result.exit_code == EXIT_BAD_INPUT
    assert result.stderr == (
        f"error: manifest {manifest}: 1 problem, nothing was trained:\n"
        "  line 1, column 'size': unknown column; allowed: product_line, train_uri, val_uri, "
        "test_uri, image_size, epochs, backbone, preset, layers, feature_norm, smoothing_sigma, "
        "image_score, topk_fraction, score_norm, global_weight, tile_overlap, tile_scale, "
        "max_tiles, tile, pixel_fpr, image_fpr\n"
    )
    assert not models.exists()


def test_failed_line_exits_non_zero(ray_session: object, tmp_path: Path, data: Path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(4):
        (corrupt / f"{i}.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"product_line,train_uri\nbroken,{corrupt}\nwood,{data / 'wood_panel' / 'train' / 'good'}\n"
    )
    models = tmp_path / "models"
    result = CliRunner().invoke(
        main,
        ["train", "--products", str(manifest), "--models-uri", str(models), *FLAGS, "--only",
         "broken,wood"],
    )  # fmt: skip
    assert result.exit_code == EXIT_FAILED, result.output
    assert (
        f"FAILED broken: only 0 of 4 images in train_uri {corrupt} could be decoded, at least 4 "
        f"needed (e.g. {corrupt}/0.png: empty_file;"
    ) in result.stdout
    assert registry.list_product_lines(str(models)) == ["wood"]


def test_demo_steps(ray_session: object, tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    config = DemoConfig(
        workdir=str(tmp_path / "demo"),
        product_lines=("metal_plate", "ceramic_tile"),
        n_train=6,
        n_test_good=2,
        n_test_defect=3,
        image_size=64,
        epochs=2,
        cpus_per_task=0.5,
    )
    result = run_demo(config)
    assert [r.status for r in result.train.results] == ["ok", "ok"]
    assert result.manifest.read_text().splitlines() == [
        "product_line,train_uri,test_uri",
        "metal_plate,data/metal_plate/train/good,data/metal_plate",
        "ceramic_tile,data/ceramic_tile/train/good,data/ceramic_tile",
    ]
    for r in result.train.results:
        assert set(r.metrics) >= {"image_auroc", "pixel_auroc", "pro", "f1", "iou"}
        assert r.metrics["n_images"] == 5
        assert registry.latest_version(result.models_uri, r.product_line) == r.version
    assert f"models:    {result.models_uri}" in result.describe()
    # a small run's actor pool fits its blocks: no "minimum number of concurrent actors" warning
    noise = [str(w.message) for w in recwarn if "concurrent actors" in str(w.message)]
    assert not noise, noise


@pytest.mark.slow
def test_installed_entry_point(tmp_path: Path, data: Path) -> None:
    """The real console script, starting its own local Ray in a fresh process."""
    exe = shutil.which("dfr-pipeline") or str(Path(sys.executable).parent / "dfr-pipeline")
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"product_line,train_uri,test_uri\nwood,{data / 'wood_panel' / 'train' / 'good'},"
        f"{data / 'wood_panel'}\n"
    )
    models = tmp_path / "models"
    proc = subprocess.run(
        [exe, "train", "--products", str(manifest), "--models-uri", f"file://{models}", *FLAGS],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    version = registry.latest_version(str(models), "wood")
    assert version is not None and version in proc.stdout
    assert registry.list_versions(str(models), "wood") == [version]
