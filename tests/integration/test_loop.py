"""The nightly loop end to end on local Ray and generated data: the promotion gate holds a
weak version and ``models promote`` overrides it; QA feedback retraining flags fewer of the
false positives' kind at the same calibrated FPR; bad feedback trains nothing; ``nightly``
writes the drift table and exits 6 (EXIT_DRIFT) on a brighter night but not on a normal one;
``evaluate`` stores a record beside the version."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from dfr_core.preprocess import resize_image
from pipeline import drift_io, evaluation, outputs, promotion, registry
from pipeline.cli import EXIT_BAD_INPUT, main
from pipeline.drift_io import DRIFT_SCHEMA
from pipeline.report import ReportConfig, write_report
from pipeline.score_cli import EXIT_DRIFT
from pipeline.synthetic import SyntheticSpec, write_mvtec_dataset
from pipeline.synthetic_shifts import brighten, normal_images, rotate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]
LINE = "metal_plate"
SIZE = 64
FLAGS = ["--image-size", str(SIZE), "--cpus-per-task", "0.5"]


def _save(images: list[np.ndarray], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        write_mvtec_dataset(root / "data", SyntheticSpec((LINE,), 40, 10, 10, 128, seed=0))
        self.line_dir = root / "data" / LINE
        rng = np.random.default_rng(77)
        # Parts mounted turned by 90 degrees: normal, but unlike every training image.
        rotated = [rotate(x) for x in normal_images(LINE, rng, 30)]
        self.feedback_images = _save(rotated[:10], root / "rotated" / "feedback")
        self.rotated_held_out = _save(rotated[10:], root / "rotated" / "held_out")
        self.models = root / "models"

    def manifest(self, epochs: int) -> Path:
        path = self.root / f"manifest-{epochs}.csv"
        path.write_text(
            "product_line,train_uri,test_uri,epochs\n"
            f"{LINE},{self.line_dir / 'train' / 'good'},{self.line_dir},{epochs}\n"
        )
        return path

    def copy_models(self, target: Path) -> str:
        shutil.copytree(self.models, target)
        return str(target)


def _train(manifest: Path, models: str, *extra: str):
    args = ["train", "--products", str(manifest), "--models-uri", models, *FLAGS, *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def world(ray_session, tmp_path_factory: pytest.TempPathFactory) -> World:
    """A good first version of the line (5 epochs) in a local registry."""
    w = World(tmp_path_factory.mktemp("loop"))
    result = _train(w.manifest(5), str(w.models))
    assert result.exit_code == 0, result.output
    return w


def test_weak_version_is_held_and_promote_overrides(world: World, tmp_path: Path) -> None:
    models = world.copy_models(tmp_path / "models")
    good = registry.latest_version(models, LINE)

    result = _train(world.manifest(1), models)  # one epoch: deliberately weak

    assert result.exit_code == 0, result.output
    weak = [v for v in registry.list_versions(models, LINE) if v != good]
    assert len(weak) == 1 and registry.latest_version(models, LINE) == good
    assert f"NOT PROMOTED {LINE} {weak[0]}: held: worse than LATEST {good}" in result.stdout
    decision = promotion.decisions_by_version(models, LINE)[weak[0]]
    deltas = [decision["comparison"][name]["delta"] for name in promotion.GATED_METRICS]
    assert decision["promote"] is False
    assert min(d for d in deltas if d is not None) < -promotion.DEFAULT_TOLERANCE
    listed = CliRunner().invoke(main, ["models", "list", "--models-uri", models])
    assert f"newer versions held back: {weak[0]}" in listed.stdout
    assert "held (gate)" in listed.stdout

    args = ["models", "promote", LINE, weak[0], "--models-uri", models, "--reason", "test"]
    forced = CliRunner().invoke(main, args)

    assert forced.exit_code == 0, forced.output
    assert registry.latest_version(models, LINE) == weak[0]
    listed = CliRunner().invoke(main, ["models", "list", "--models-uri", models])
    assert f"LATEST {LINE} {weak[0]}: promoted by hand over {good}: test" in listed.stdout


def _flag_rate(models: str, version: str, paths: list[Path]) -> float:
    loaded = evaluation.load_version(models, LINE, version, str(Path(models) / ".cache"))
    rows = drift_io.rows_of_images(
        loaded.model,
        loaded.calibration,
        np.stack([resize_image(np.asarray(Image.open(p)), SIZE) for p in paths]),
    )
    return float(np.mean(rows["is_anomaly"]))


def test_feedback_retraining_flags_fewer_false_positives(world: World, tmp_path: Path) -> None:
    models = world.copy_models(tmp_path / "models")
    before = registry.latest_version(models, LINE)
    table = tmp_path / "feedback.csv"
    rows = [f"{p},{LINE},normal,,qa-ann,2024-05-02T09:00:00" for p in world.feedback_images]
    defect = next((world.line_dir / "test" / "crack").glob("*.png"))
    mask = world.line_dir / "ground_truth" / "crack" / f"{defect.stem}_mask.png"
    rows.append(f"{defect},{LINE},defect,{mask},qa-bob,")
    table.write_text("image_uri,product_line,label,mask_uri,reviewer,reviewed_at\n"
                     + "\n".join(rows) + "\n")  # fmt: skip

    result = _train(world.manifest(5), models, "--feedback", str(table))

    assert result.exit_code == 0, result.output
    after = [v for v in registry.list_versions(models, LINE) if v != before][0]
    meta = registry.read_version_metadata(models, LINE, after)
    assert meta["extra"]["feedback"]["normals_trained"] == 10
    assert meta["extra"]["feedback"]["defects_evaluated"] == 1
    assert meta["extra"]["feedback"]["sha256"] == hashlib.sha256(table.read_bytes()).hexdigest()
    first = registry.read_version_metadata(models, LINE, before)
    assert meta["extra"]["train_image_count"] == first["extra"]["train_image_count"] + 10
    old_rate = _flag_rate(models, before, world.rotated_held_out)
    new_rate = _flag_rate(models, after, world.rotated_held_out)
    assert old_rate >= 0.5, old_rate  # the first model flags the unseen (normal) kind
    assert new_rate < old_rate, (old_rate, new_rate)


def test_bad_feedback_trains_and_promotes_nothing(world: World, tmp_path: Path) -> None:
    models = world.copy_models(tmp_path / "models")
    versions = registry.list_versions(models, LINE)
    table = tmp_path / "feedback.csv"
    table.write_text(
        "image_uri,product_line,label\n"
        f"{tmp_path / 'gone.png'},{LINE},normal\n"
        f"{world.feedback_images[0]},{LINE},fine\n"
        f"{world.feedback_images[1]},carpet,normal\n"
    )

    result = _train(world.manifest(1), models, "--feedback", str(table))

    assert result.exit_code == EXIT_BAD_INPUT
    assert "3 problems, nothing was trained or promoted" in result.stderr
    assert "line 2, column 'image_uri': not found" in result.stderr
    assert "line 3, column 'label': 'fine' is neither" in result.stderr
    assert "line 4, column 'product_line': product line 'carpet' has no model" in result.stderr
    assert registry.list_versions(models, LINE) == versions


def _night(world: World, name: str, images: list[np.ndarray]) -> Path:
    prefix = world.root / "nights" / name
    _save(images, prefix / LINE)
    return prefix


def _nightly(world: World, tmp_path: Path, input_uri: Path, output: Path, date: str):
    from pipeline.score_cli import nightly

    config = tmp_path / f"nightly-{date}.yaml"
    config.write_text(textwrap.dedent(f"""\
        models_uri: {world.models}
        input_uri: {input_uri}
        output_uri: {output}
        run_date: {date}
        cpus_per_actor: 0.5
        max_actors: 2
        decode_cpus: 0.25
        batch_size: 16
        masks: none
        cache_dir: {tmp_path / "cache"}
        drift_min_images: 20
    """))  # fmt: skip
    return CliRunner().invoke(nightly, ["--config", str(config), "--quiet"])


def test_nightly_flags_a_brighter_night_not_a_normal_one(world: World, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    normal = normal_images(LINE, rng, 40)
    output = tmp_path / "out"

    ok = _nightly(world, tmp_path, _night(world, "normal", normal), output, "2024-05-01")
    bright = [brighten(x) for x in normal_images(LINE, rng, 40)]
    shifted = _nightly(world, tmp_path, _night(world, "bright", bright), output, "2024-05-02")

    assert ok.exit_code == 0, ok.output
    assert "DRIFT" not in ok.output
    assert shifted.exit_code == EXIT_DRIFT, shifted.output
    assert f"DRIFT {LINE} (2024-05-02): " in shifted.stderr and "brightness shift" in shifted.stderr
    table = drift_io.read_drift(str(output))
    assert list(table["run_date"]) == ["2024-05-01", "2024-05-02"]
    assert list(table["drifted"]) == [False, True] and list(table["n_ok"]) == [40, 40]
    files = sorted((output / "drift").rglob("*.parquet"))
    assert [f.parent.name for f in files] == [f"product_line={LINE}"] * 2
    stored = pq.read_table(io.BytesIO(files[1].read_bytes()))
    assert stored.schema.equals(DRIFT_SCHEMA) and stored.column("drifted").to_pylist() == [True]
    record = outputs.committed_runs(str(output))[-1]
    assert record["drift"]["drifted"] == [LINE]
    scores = outputs.read_scores(str(output), "2024-05-02")
    assert scores["brightness"].notna().all() and (scores["sharpness"] > 0).all()

    reviewed = sorted((world.root / "nights" / "bright" / LINE).glob("*.png"))[0]
    table = tmp_path / "feedback.csv"
    table.write_text(f"image_uri,product_line,label,reviewer\n{reviewed},{LINE},normal,ann\n")
    config = ReportConfig(str(output), str(tmp_path / "report"), feedback_uri=str(table))
    page = write_report(config).read_text()
    assert 'data-drift-date="2024-05-01" data-drifted="false"' in page
    assert 'data-drift-date="2024-05-02" data-drifted="true"' in page
    assert 'data-verdict="normal"' in page and "ann" in page


def test_evaluate_prints_and_stores_a_record(world: World, tmp_path: Path) -> None:
    models = str(world.models)
    version = registry.latest_version(models, LINE)
    args = ["evaluate", "--models-uri", models, "--product", LINE, "--data", str(world.line_dir)]

    result = CliRunner().invoke(main, [*args, "--json", "--cache-dir", str(tmp_path)])

    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["version"] == version and record["metrics"]["n_images"] == 20
    for key in ("image_auroc", "pixel_auroc", "pro", "tpr_at_1pct_fpr", "realised_image_fpr"):
        assert record["metrics"][key] is not None
    stored = json.loads(Path(record["record_uri"]).read_text())
    assert stored["metrics"]["image_auroc"] == record["metrics"]["image_auroc"]

    listing = tmp_path / "labelled.csv"
    good = sorted((world.line_dir / "test" / "good").glob("*.png"))
    spots = sorted((world.line_dir / "test" / "spot").glob("*.png"))
    listing.write_text("image_uri,label\n" + "".join(f"{p},normal\n" for p in good)
                       + "".join(f"{p},defect\n" for p in spots))  # fmt: skip
    text = CliRunner().invoke(main, [*args[:-1], str(listing), "--cache-dir", str(tmp_path)])
    assert text.exit_code == 0, text.output
    assert "image AUROC" in text.stdout and "pixel AUROC" in text.stdout

    listing.write_text(f"image_uri,label\n{good[0]},broken\n")
    bad = CliRunner().invoke(main, [*args[:-1], str(listing)])
    assert bad.exit_code == EXIT_BAD_INPUT and "line 2, column 'label'" in bad.stderr
    carpet = ["evaluate", "--models-uri", models, "--product", "carpet", "--data", str(listing)]
    missing = CliRunner().invoke(main, carpet)
    assert missing.exit_code == EXIT_BAD_INPUT
    assert "product line 'carpet' has no model" in missing.stderr
