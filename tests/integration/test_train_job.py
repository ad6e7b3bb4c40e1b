"""The training job end to end: manifest -> Ray tasks -> S3 registry -> models loaded back.

Runs against the session's moto S3 server and local Ray (2 CPUs), with 64 px images, 2 epochs
and half a CPU per task so that several tasks fit on a 2-core machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray

from dfr_core.artifact import load_model
from dfr_core.calibrate import calibrate
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.datasets import list_category
from dfr_core.datasets import load_images as load_local
from dfr_core.evaluate import evaluate
from dfr_core.train import EpochStats
from pipeline import registry, storage, train_task
from pipeline.demo.synthetic import SyntheticSpec, write_mvtec_dataset
from pipeline.image_sets import load_images, resolve_images
from pipeline.manifest import ManifestError, ManifestRow
from pipeline.mvtec_remote import load_labelled_set
from pipeline.progress import ProgressPrinter
from pipeline.storage import StorageOptions
from pipeline.train_job import TrainJobConfig, run_train_job
from pipeline.train_task import ERROR, OK, LineTask, get_extractor, is_transient, train_line

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]
SIZE = 64
GARBAGE = b"\x89PNG but not really an image"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    spec = SyntheticSpec(
        product_lines=("metal_plate", "ceramic_tile"),
        n_train=10,
        n_test_good=3,
        n_test_defect=3,
        size=SIZE,
    )
    write_mvtec_dataset(root, spec)
    return root


def upload_tree(local: Path, uri: str) -> str:
    """Copy a local folder to a storage URI (same relative layout); returns the URI."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            parts = path.relative_to(local).parts
            storage.write_bytes_atomic(storage.join_uri(uri, *parts), path.read_bytes())
    return uri


def job(manifest: str, models: str, **overrides: object) -> TrainJobConfig:
    settings: dict = dict(
        manifest_uri=manifest,
        models_uri=models,
        epochs=2,
        image_size=SIZE,
        cpus_per_task=0.5,
        retry_delay_s=0.0,
        progress_interval_s=0.0,
    )
    settings.update(overrides)
    return TrainJobConfig(**settings)  # type: ignore[arg-type]


def test_two_lines_into_s3_and_loaded_back(
    ray_session: object, s3_bucket: str, synthetic: Path, tmp_path: Path
) -> None:
    metal = upload_tree(synthetic / "metal_plate", f"{s3_bucket}/data/metal_plate")
    storage.write_bytes_atomic(f"{metal}/train/good/zz_corrupt.png", GARBAGE)
    tile_train = sorted((synthetic / "ceramic_tile" / "train" / "good").glob("*.png"))
    for path in tile_train:
        storage.write_bytes_atomic(f"{s3_bucket}/data/tile/all/{path.name}", path.read_bytes())
    listing = "\n".join(f"{s3_bucket}/data/tile/all/{p.name}" for p in tile_train[:8])
    storage.write_text_atomic(f"{s3_bucket}/lists/tile_train.txt", listing + "\n")
    for path in tile_train[8:]:
        storage.write_bytes_atomic(f"{s3_bucket}/data/tile/val/{path.name}", path.read_bytes())
    manifest = f"{s3_bucket}/manifest.csv"
    storage.write_text_atomic(
        manifest,
        "product_line,train_uri,val_uri,test_uri\n"
        f"metal_plate,{metal}/train/good,,{metal}\n"
        f"ceramic_tile,{s3_bucket}/lists/tile_train.txt,{s3_bucket}/data/tile/val,\n",
    )
    models = f"{s3_bucket}/models"
    lines: list[str] = []

    result = run_train_job(job(manifest, models), echo=lines.append)

    assert [r.status for r in result.results] == [OK, OK], result.results
    metal_r, tile_r = result.results
    # Disjoint early-stopping and calibration slices (issue 10): 10 good images -> 8 train,
    # 1 early-stops, 1 calibrates; with a val_uri, 1 of 8 early-stops and val_uri's 2 calibrate.
    assert (metal_r.train_images, metal_r.held_out_images, metal_r.skipped_images) == (
        8,
        2,
        1,
    )
    assert (tile_r.train_images, tile_r.held_out_images, tile_r.skipped_images) == (
        7,
        3,
        0,
    )
    assert tile_r.metrics == {}
    for name in ("metal_plate", "ceramic_tile"):
        assert any(line.startswith(name) and "epoch 2/2" in line for line in lines), lines
    assert registry.list_product_lines(models) == ["ceramic_tile", "metal_plate"]
    node_id = ray.get_runtime_context().get_node_id()

    cache = tmp_path / "cache"
    for r, row_line, name in ((metal_r, 2, "metal_plate"), (tile_r, 3, "ceramic_tile")):
        assert registry.list_versions(models, name) == [r.version]
        assert registry.latest_version(models, name) == r.version
        loaded = load_model(registry.fetch(models, name, r.version, cache))
        extra = loaded.metadata.extra
        assert extra["product_line"] == name
        assert extra["version"] == r.version
        assert extra["manifest_row"]["line"] == row_line
        assert extra["train_image_count"] == r.train_images
        assert extra["device"] == "cpu"
        assert extra["node_id"] == node_id
        assert extra["weights_uri"] is None
        assert loaded.metadata.training.epochs_run == 2
        assert loaded.calibration.image_threshold == r.image_threshold

    # The stored thresholds are reproduced by the loaded model on the same held-out images.
    tile = load_model(registry.fetch(models, "ceramic_tile", tile_r.version, cache))
    val = load_images(resolve_images(f"{s3_bucket}/data/tile/val"), SIZE).images
    again = calibrate(tile.model, val, CalibrationConfig())
    assert again.image_threshold == pytest.approx(tile.calibration.image_threshold, rel=1e-5)
    assert again.pixel_threshold == pytest.approx(tile.calibration.pixel_threshold, rel=1e-5)

    # Stored metrics are those of the loaded model on the labelled set.
    metal_model = load_model(registry.fetch(models, "metal_plate", metal_r.version, cache))
    test = load_labelled_set(metal, SIZE)
    assert len(test.images) == 6 and int(test.labels.sum()) == 3
    ev = evaluate(metal_model.model, test.images, test.masks, test.labels, metal_model.calibration)
    stored = metal_model.metadata.metrics.fields
    assert stored["n_images"] == 6 and stored["skipped_images"] == 0
    for key in ("image_auroc", "pixel_auroc", "pro", "f1", "iou"):
        assert stored[key] == pytest.approx(getattr(ev, key), abs=1e-6)


def test_failing_lines_do_not_stop_the_others(
    ray_session: object, s3_bucket: str, synthetic: Path
) -> None:
    train = synthetic / "metal_plate" / "train" / "good"
    good = upload_tree(train, f"{s3_bucket}/good")
    for i in range(5):
        storage.write_bytes_atomic(f"{s3_bucket}/corrupt/{i}.png", GARBAGE)
    for path in sorted(train.glob("*.png"))[:6]:
        storage.write_bytes_atomic(f"{s3_bucket}/mostly/{path.name}", path.read_bytes())
    for i in range(3):
        storage.write_bytes_atomic(f"{s3_bucket}/mostly/bad{i}.png", GARBAGE)
    manifest = f"{s3_bucket}/manifest.csv"
    storage.write_text_atomic(
        manifest,
        "product_line,train_uri\n"
        f"all_corrupt,{s3_bucket}/corrupt\n"
        f"fine,{good}\n"
        f"mostly_corrupt,{s3_bucket}/mostly\n",
    )
    models = f"{s3_bucket}/models"

    result = run_train_job(job(manifest, models), echo=lambda text: None)

    by_line = {r.product_line: r for r in result.results}
    assert [r.product_line for r in result.failed] == ["all_corrupt", "mostly_corrupt"]
    assert by_line["fine"].status == OK
    assert by_line["all_corrupt"].status == ERROR
    assert by_line["all_corrupt"].attempts == 1  # data errors are not retried
    assert by_line["all_corrupt"].error.startswith(
        f"only 0 of 5 images in train_uri {s3_bucket}/corrupt could be decoded, at least 4 "
        f"needed (e.g. {s3_bucket}/corrupt/0.png: not_an_image;"
    )
    assert by_line["mostly_corrupt"].error.startswith(
        f"3 of 9 images in train_uri {s3_bucket}/mostly are unreadable, more than the 25% tolerated"
    )
    assert registry.list_product_lines(models) == ["fine"]
    assert registry.latest_version(models, "all_corrupt") is None


def test_bad_manifest_trains_nothing(ray_session: object, s3_bucket: str, synthetic: Path):
    good = upload_tree(synthetic / "metal_plate" / "train" / "good", f"{s3_bucket}/good")
    manifest = f"{s3_bucket}/manifest.csv"
    storage.write_text_atomic(
        manifest,
        f"product_line,train_uri\nfine,{good}\ntypo,{s3_bucket}/goood\nfine,{good}\n",
    )
    with pytest.raises(ManifestError) as info:
        run_train_job(job(manifest, f"{s3_bucket}/models"))
    assert [str(p) for p in info.value.problems] == [
        "line 4, column 'product_line': duplicate product line 'fine' (first on line 2)"
    ]
    storage.write_text_atomic(manifest, f"product_line,train_uri\nfine,{good}\ntypo,x/y\n")
    with pytest.raises(ManifestError) as info:
        run_train_job(job(manifest, f"{s3_bucket}/models"))
    assert [str(p) for p in info.value.problems] == [
        "line 3, column 'train_uri': relative path 'x/y' in a remote manifest: use an absolute URI"
    ]
    storage.write_text_atomic(manifest, f"product_line,train_uri\ntypo,{s3_bucket}/goood\n")
    with pytest.raises(ManifestError) as info:
        run_train_job(job(manifest, f"{s3_bucket}/models"))
    assert [str(p) for p in info.value.problems] == [
        f"line 2, column 'train_uri': not found: {s3_bucket}/goood"
    ]
    assert registry.list_product_lines(f"{s3_bucket}/models") == []


def test_weights_flag_conflicts_with_backbone_override(tmp_path: Path, synthetic: Path) -> None:
    train = synthetic / "metal_plate" / "train" / "good"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"product_line,train_uri,backbone\na,{train},vgg19\n")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    config = job(str(manifest), str(tmp_path / "models"), weights_uri=str(weights))
    with pytest.raises(ManifestError) as info:
        run_train_job(config)
    assert [str(p) for p in info.value.problems] == [
        "line 2, column 'backbone': 'vgg19' differs from the job's backbone 'mobilenet_v2', "
        "which the --weights file is for"
    ]


# --------------------------------------------------------------------------------------------
# the task body and its parts, without Ray


def _task(tmp_path: Path, train_uri: str, retries: int = 2) -> LineTask:
    return LineTask(
        row=ManifestRow(line=2, product_line="p", train_uri=train_uri),
        model=ModelConfig(image_size=SIZE),
        train=TrainConfig(epochs=1),
        calibration=CalibrationConfig(),
        models_uri=str(tmp_path / "models"),
        weights_uri=None,
        storage=StorageOptions(),
        min_train_images=4,
        max_bad_fraction=0.25,
        retries=retries,
        retry_delay_s=0.0,
        cache_dir=str(tmp_path / "cache"),
        threads=1,
    )


def test_transient_errors_are_retried_and_data_errors_are_not(
    tmp_path: Path, synthetic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = train_task._train_once
    calls: list[int] = []

    def flaky(task: LineTask, reporter: object) -> dict:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return real(task, reporter)  # type: ignore[arg-type]

    monkeypatch.setattr(train_task, "_train_once", flaky)
    train = str(synthetic / "metal_plate" / "train" / "good")
    result = train_line(_task(tmp_path, train))
    assert (result.status, result.attempts, len(calls)) == (OK, 2, 2)
    assert registry.latest_version(str(tmp_path / "models"), "p") == result.version

    monkeypatch.undo()
    result = train_line(_task(tmp_path, str(tmp_path / "absent")))
    assert (result.status, result.attempts) == (ERROR, 1)
    assert result.error.startswith("FileNotFoundError: no such file or prefix")

    def always_down(task: LineTask, reporter: object) -> dict:
        raise TimeoutError("read timed out")

    monkeypatch.setattr(train_task, "_train_once", always_down)
    result = train_line(_task(tmp_path, train, retries=3))
    assert (result.status, result.attempts) == (ERROR, 4)
    assert result.error == "TimeoutError: read timed out"


def test_is_transient() -> None:
    assert is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    assert is_transient(OSError("503 SlowDown"))
    for exc in (FileNotFoundError(), PermissionError(), ValueError(), MemoryError()):
        assert not is_transient(exc)


def test_backbone_is_built_once_per_worker() -> None:
    first = get_extractor(ModelConfig(image_size=64), None)
    second = get_extractor(ModelConfig(image_size=128), None)
    assert first.backbone is second.backbone
    assert (first.image_size, second.image_size) == (64, 128)


def test_progress_lines() -> None:
    lines: list[str] = []
    printer = ProgressPrinter(lines.append, min_interval_s=3600.0)
    printer.handle({"product_line": "metal", "kind": "stage", "stage": "reading images"})
    for epoch in range(1, 5):
        stats = EpochStats(epoch, 4, 1.0 / epoch, 0.5, 10.0)
        printer.handle({"product_line": "metal", "kind": "epoch", **stats._asdict()})
    assert lines == [
        "metal         reading images",
        "metal         epoch 1/4  loss 1.0000  val 0.5000  ETA 30s",
        "metal         epoch 4/4  loss 0.2500  val 0.5000  ETA 0s",
    ]


def test_images_are_exact(synthetic: Path) -> None:
    """Training reads the same pixels as the local MVTec reader (same decode + resize path)."""
    train, _ = list_category(synthetic / "metal_plate")
    ours = load_images([str(p) for p in train], SIZE)
    assert ours.failures == [] and ours.uris == [str(p) for p in train]
    np.testing.assert_array_equal(ours.images, load_local(train, SIZE))
