"""Training, calibration, scoring and the artifact round trip on tiny synthetic tensors."""

import json

import numpy as np
import pytest
import torch

from dfr_core.artifact import ArtifactError, load_model, read_metadata, save_model
from dfr_core.calibrate import Calibration, calibrate, compute_maps, upper_quantile
from dfr_core.config import CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor, gaussian_blur
from dfr_core.train import fit, holdout_split

SIZE = 64
MODEL = ModelConfig(backbone="vgg19", layers=("relu1_1", "relu2_1", "relu3_1"), image_size=SIZE)
TRAIN = TrainConfig(epochs=3, batch_size=2, positions_per_image=64, patience=0, seed=0)


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, SIZE, dtype=np.float32)[None, :, None]
    noise = rng.normal(0, 8, size=(n, SIZE, SIZE, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    extractor = build_extractor(MODEL, allow_random_init=True)
    result = fit(extractor, MODEL, TRAIN, _images(6, 0), _images(2, 1))
    cal = calibrate(result.model, _images(3, 2), CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    return result, cal


def test_fit_summary_and_shapes(trained):
    result, cal = trained
    s = result.summary
    assert s["train_images"] == 6 and s["val_images"] == 2
    assert s["channels"] == 64 + 128 + 256
    assert 1 <= s["latent_dim"] <= s["channels"]
    assert s["epochs_run"] == 3 and len(s["history"]) == 3
    out = compute_maps(result.model, _images(2, 3))
    assert out.anomaly_map.shape == (2, SIZE, SIZE) and out.score.shape == (2,)
    assert torch.isfinite(out.anomaly_map).all() and (out.anomaly_map >= 0).all()
    assert torch.allclose(out.max_score, out.anomaly_map.flatten(1).max(dim=1).values)
    assert torch.isfinite(out.score).all()
    assert cal.pixel_threshold > 0 and cal.n_images == 3


def test_fit_is_deterministic_under_seed(trained):
    result, _ = trained
    torch.manual_seed(123)  # the global seed must not matter
    extractor = build_extractor(MODEL, allow_random_init=True)
    extractor.load_state_dict(result.model.extractor.state_dict())
    again = fit(extractor, MODEL, TRAIN, _images(6, 0), _images(2, 1))
    a = result.model.head.state_dict()
    b = again.model.head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_defect_scores_higher_than_normal(trained):
    result, _ = trained
    normal = _images(2, 7)
    defect = normal.copy()
    defect[:, 20:36, 20:36] = [255, 0, 255]
    out = compute_maps(result.model, np.concatenate([normal, defect]))
    assert out.score[2:].min() > out.score[:2].max()


def test_predict_accepts_any_size_and_grayscale(trained):
    result, _ = trained
    gray = np.full((100, 37), 128, dtype=np.uint8)
    out = result.model.predict([gray, np.zeros((64, 64, 4), dtype=np.uint8)])
    assert out.anomaly_map.shape == (2, SIZE, SIZE)


def test_artifact_round_trip_gives_identical_maps(trained, tmp_path):
    result, cal = trained
    save_model(result.model, tmp_path, cal, training=result.summary, extra={"product": "x"})
    loaded = load_model(tmp_path, extractor=result.model.extractor)
    assert loaded.calibration == cal
    assert loaded.metadata.extra == {"product": "x"}
    images = _images(3, 9)
    before = compute_maps(result.model, images)
    after = compute_maps(loaded.model, images)
    assert torch.equal(before.anomaly_map, after.anomaly_map)
    assert torch.equal(before.score, after.score)


def test_load_model_rebuilds_the_backbone(tmp_path):
    """Real backbone weights (offline MobileNetV2) rebuilt from the registry by name."""
    config = ModelConfig(backbone="mobilenet_v2", image_size=SIZE)
    extractor = build_extractor(config)
    result = fit(extractor, config, TRAIN, _images(4, 0))
    save_model(result.model, tmp_path)
    rebuilt = load_model(str(tmp_path)).model
    images = _images(2, 5)
    assert torch.equal(
        compute_maps(result.model, images).anomaly_map, compute_maps(rebuilt, images).anomaly_map
    )


def test_checksum_mismatch_is_refused(trained, tmp_path):
    result, cal = trained
    save_model(result.model, tmp_path, cal)
    data = bytearray((tmp_path / "head.pt").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "head.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_model(tmp_path, extractor=result.model.extractor)


def test_newer_format_and_missing_files_are_refused(trained, tmp_path):
    result, _ = trained
    save_model(result.model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="newer"):
        read_metadata(tmp_path)
    with pytest.raises(ArtifactError, match="missing model config"):
        read_metadata(tmp_path / "nowhere")


def test_pickle_payload_is_never_executed(trained, tmp_path):
    result, _ = trained
    meta = save_model(result.model, tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Evil()}, tmp_path / "head.pt")
    import hashlib

    meta["files"]["head.pt"] = hashlib.sha256((tmp_path / "head.pt").read_bytes()).hexdigest()
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="not a plain tensor state dict"):
        load_model(tmp_path, extractor=result.model.extractor)
    assert not marker.exists()


def test_random_init_model_cannot_be_rebuilt_without_its_extractor(trained, tmp_path):
    result, _ = trained
    save_model(result.model, tmp_path)
    with pytest.raises(ArtifactError, match="random-init backbone"):
        load_model(tmp_path)


def test_wrong_backbone_weights_are_refused(trained, tmp_path):
    result, _ = trained
    meta = save_model(result.model, tmp_path)
    meta["backbone"]["weights_sha256"] = "0" * 64
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="weights sha256"):
        load_model(tmp_path, extractor=result.model.extractor)


def test_upper_quantile_meets_target_fpr():
    values = np.arange(1000, dtype=float)
    t = upper_quantile(values, 0.005)
    assert (values > t).mean() <= 0.005 and (values >= t).mean() > 0.005


def test_gaussian_blur_preserves_mass_and_constant():
    x = torch.zeros(1, 33, 33)
    x[0, 16, 16] = 1.0
    y = gaussian_blur(x, 2.0)
    assert abs(y.sum().item() - 1.0) < 1e-4 and y[0, 16, 16] == y.max()
    c = torch.full((1, 8, 8), 3.0)
    assert torch.allclose(gaussian_blur(c, 4.0), c)


def test_holdout_split_is_disjoint_and_deterministic():
    tr, va = holdout_split(10, 0.2, seed=1)
    assert len(va) == 2 and not set(tr) & set(va) and len(tr) + len(va) == 10
    assert np.array_equal(holdout_split(10, 0.2, seed=1)[1], va)


def test_configs_validate():
    with pytest.raises(ValueError):
        ModelConfig(image_size=100)
    with pytest.raises(ValueError):
        ModelConfig(feature_norm="zscore")
    with pytest.raises(ValueError):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError):
        CalibrationConfig(pixel_fpr=0)
    assert isinstance(Calibration(1.0, 2.0, 0.1, 0.1, 3), Calibration)


def test_evaluation_curves_are_thinned_and_span_the_range():
    from dfr_core.evaluate import evaluation_curves
    from dfr_core.model import AnomalyOutput

    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((6, 16, 16)).astype(np.float32))
    masks = np.zeros((6, 16, 16), dtype=bool)
    masks[3:, 4:8, 4:8] = True
    maps[3:, 4:8, 4:8] += 0.5
    out = AnomalyOutput(maps, maps.flatten(1).amax(dim=1))
    curves = evaluation_curves(out, masks, np.array([0, 0, 0, 1, 1, 1]), max_points=20)
    roc, pro = curves["roc"], curves["pro"]
    assert (
        len(roc["fpr"]) == len(roc["tpr"]) <= 20 and roc["fpr"][0] == 0.0 and roc["fpr"][-1] == 1.0
    )
    assert len(pro["fpr"]) == len(pro["pro"]) <= 20 and abs(pro["fpr"][-1] - 0.3) < 1e-9
    only_normal = evaluation_curves(out, np.zeros_like(masks), np.zeros(6))
    assert only_normal == {}
