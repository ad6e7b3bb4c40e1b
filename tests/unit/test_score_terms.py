"""Image-score terms (top-k mean, global Gaussian, normalisation), the honest held-out split,
early stopping, and old model.json files keeping their meaning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dfr_core import train as train_mod
from dfr_core.artifact import ArtifactError, load_model, save_model
from dfr_core.calibrate import calibrate, compute_maps
from dfr_core.config import LEGACY_V1_MODEL_FIELDS, CalibrationConfig, ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.scoring import aggregate, ledoit_wolf, mahalanobis, normalise, quantile_scale
from dfr_core.train import EarlyStopping, fit, holdout_splits

SIZE = 64
LAYERS = ("relu1_1", "relu2_1", "relu3_1")
FUSED = ModelConfig(backbone="vgg19", layers=LAYERS, image_size=SIZE, global_weight=1.0)
LEGACY = ModelConfig(backbone="vgg19", layers=LAYERS, image_size=SIZE, **LEGACY_V1_MODEL_FIELDS)
TRAIN = TrainConfig(epochs=2, batch_size=2, positions_per_image=64, patience=0, seed=0)


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = np.linspace(60, 200, SIZE, dtype=np.float32)[None, :, None]
    return np.clip(base + rng.normal(0, 8, size=(n, SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return build_extractor(FUSED, allow_random_init=True)


@pytest.fixture(scope="module")
def fused(extractor):
    return fit(extractor, FUSED, TRAIN, _images(6, 0), _images(3, 1))


# ---- the terms themselves -------------------------------------------------------------------


def test_aggregate_max_and_topk_mean():
    maps = torch.arange(100, dtype=torch.float32).view(1, 10, 10)
    assert aggregate(maps, "max", 0.01).item() == 99.0
    assert aggregate(maps, "topk_mean", 0.05).item() == pytest.approx(np.mean([95, 96, 97, 98, 99]))
    assert aggregate(maps, "topk_mean", 1e-9).item() == 99.0  # at least one pixel
    with pytest.raises(ValueError, match="unknown image_score"):
        aggregate(maps, "median", 0.01)


def _ledoit_wolf_reference(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The textbook (loop) formula of Ledoit & Wolf 2004, as sklearn computes it."""
    xc = x - x.mean(0)
    n, p = xc.shape
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    d2 = ((s - mu * np.eye(p)) ** 2).sum()
    b2 = sum(((np.outer(r, r) - s) ** 2).sum() for r in xc) / n**2
    a = min(b2, d2) / d2
    return (1 - a) * s + a * mu * np.eye(p), a


def test_ledoit_wolf_matches_reference_and_mahalanobis():
    x = np.random.default_rng(0).normal(size=(20, 6)) * np.array([1, 2, 3, 1, 1, 5])
    mean, precision, shrink = ledoit_wolf(torch.from_numpy(x))
    cov, a = _ledoit_wolf_reference(x)
    assert shrink == pytest.approx(a, rel=1e-6)
    np.testing.assert_allclose(precision.numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-6)
    d = mahalanobis(torch.from_numpy(x[:3]), mean, precision).numpy()
    diff = x[:3] - x.mean(0)
    np.testing.assert_allclose(
        d, np.sqrt(np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff)), rtol=1e-4
    )


def test_quantile_scale_and_normalise():
    values = torch.linspace(0, 1, 1001)
    scale = quantile_scale(values)
    assert scale.tolist() == pytest.approx([0.9, 0.995], abs=1e-6)
    assert normalise(torch.tensor([0.9, 0.995]), scale).tolist() == pytest.approx([0, 1], abs=1e-5)
    assert quantile_scale(torch.ones(5))[1] > 1.0  # never a zero-width scale


# ---- fitted models: determinism, save/load, legacy meaning ---------------------------------


def test_fused_terms_are_fitted_and_recorded(fused):
    head, info = fused.model.head, fused.summary["score_terms"]
    assert info["scales_from"] == "early_stopping" and info["scale_images"] == 3
    assert 0.0 <= info["global_shrinkage"] <= 1.0
    assert head.local_scale[1] > head.local_scale[0] and head.global_scale[1] > head.global_scale[0]
    assert not torch.equal(head.global_precision, torch.eye(head.global_precision.shape[0]))
    out = compute_maps(fused.model, _images(2, 5))
    assert torch.allclose(out.max_score, out.anomaly_map.flatten(1).amax(1))
    assert not torch.allclose(out.score, out.max_score)


def test_score_terms_deterministic_under_seed(extractor, fused):
    torch.manual_seed(999)  # the global RNG must not matter
    again = fit(extractor, FUSED, TRAIN, _images(6, 0), _images(3, 1))
    a, b = fused.model.head.state_dict(), again.model.head.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    test = _images(3, 7)
    assert torch.equal(compute_maps(fused.model, test).score, compute_maps(again.model, test).score)


def _save(model, tmp_path, name="m"):
    cal = calibrate(model, _images(4, 2), CalibrationConfig(pixel_fpr=0.01, image_fpr=0.1))
    directory = tmp_path / name
    save_model(model, directory, cal)
    return directory, cal


def test_save_load_gives_identical_scores(extractor, fused, tmp_path):
    directory, cal = _save(fused.model, tmp_path)
    loaded = load_model(directory, extractor=extractor)
    assert loaded.model.config == FUSED and loaded.calibration == cal
    assert cal.max_threshold is not None
    test = _images(3, 8)
    before, after = compute_maps(fused.model, test), compute_maps(loaded.model, test)
    assert torch.equal(before.score, after.score) and torch.equal(before.max_score, after.max_score)
    assert torch.equal(before.anomaly_map, after.anomaly_map)


def test_format_1_model_keeps_max_of_map_meaning(extractor, tmp_path):
    """A model.json written before the score options existed scores as it always did."""
    legacy = fit(extractor, LEGACY, TRAIN, _images(6, 0), _images(3, 1))
    directory, _ = _save(legacy.model, tmp_path)
    meta = json.loads((directory / "model.json").read_text())
    meta["format_version"] = 1
    for name in LEGACY_V1_MODEL_FIELDS:
        del meta["model_config"][name]
    meta["calibration"].pop("max_threshold")
    (directory / "model.json").write_text(json.dumps(meta))
    loaded = load_model(directory, extractor=extractor)
    assert loaded.model.config.image_score == "max" and loaded.model.config.global_weight == 0
    assert loaded.calibration.max_threshold is None
    out = compute_maps(loaded.model, _images(3, 9))
    assert torch.equal(out.score, out.anomaly_map.flatten(1).amax(1))
    assert torch.equal(out.score, compute_maps(legacy.model, _images(3, 9)).score)


def test_format_2_model_missing_a_field_is_refused(fused, extractor, tmp_path):
    directory, _ = _save(fused.model, tmp_path)
    meta = json.loads((directory / "model.json").read_text())
    del meta["model_config"]["image_score"]
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"format_version 2.*image_score"):
        load_model(directory, extractor=extractor)


def test_format_0_is_refused_naming_the_version(fused, extractor, tmp_path):
    directory, _ = _save(fused.model, tmp_path)
    meta = json.loads((directory / "model.json").read_text())
    meta["format_version"] = 0
    (directory / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format_version 0"):
        load_model(directory, extractor=extractor)


def test_global_term_needs_normalisation():
    with pytest.raises(ValueError, match="score_norm='quantile'"):
        ModelConfig(global_weight=1.0, score_norm="none")


# ---- held-out split and early stopping ----------------------------------------------------


@pytest.mark.parametrize("n", [4, 5, 10, 100, 763])
def test_holdout_splits_disjoint_and_complete(n):
    split = holdout_splits(n, 0.1, 0.1, seed=3)
    parts = [set(split.train), set(split.early_stopping), set(split.calibration)]
    assert sum(map(len, parts)) == n and set().union(*parts) == set(range(n))
    assert len(split.train) >= 2 and len(split.early_stopping) >= 1 and len(split.calibration) >= 1
    assert holdout_splits(n, 0.1, 0.1, seed=3).calibration.tolist() == split.calibration.tolist()


def test_early_stopping_tracks_best():
    module = torch.nn.Linear(1, 1)
    stopper = EarlyStopping(patience=2, min_delta=0.0)
    stops = []
    for epoch, loss in enumerate([5.0, 4.0, 3.0, 3.5, 3.6, 2.0], start=1):
        module.weight.data.fill_(float(epoch))
        stops.append(stopper.update(epoch, loss, module))
        if stops[-1]:
            break
    assert stops == [False, False, False, False, True]
    assert stopper.best_epoch == 3 and stopper.best_state["weight"].item() == 3.0
    stopper.restore(module)
    assert module.weight.item() == 3.0


def test_fit_restores_best_weights_on_fake_validation_losses(extractor, monkeypatch):
    """fit stops after `patience` epochs without improvement and returns the best epoch's CAE."""
    losses = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 1.0])
    monkeypatch.setattr(train_mod, "bank_loss", lambda head, bank, device: next(losses))
    snapshots = {}
    cfg = TrainConfig(epochs=7, batch_size=2, positions_per_image=32, patience=2, seed=0)

    def progress(stats):
        snapshots[stats.epoch] = {
            k: v.clone() for k, v in train_mod_head[0].state_dict().items() if k.startswith("cae.")
        }

    train_mod_head = []
    real_build_head = train_mod.build_head

    def build_head(*args, **kwargs):
        head, latent = real_build_head(*args, **kwargs)
        train_mod_head.append(head)
        return head, latent

    monkeypatch.setattr(train_mod, "build_head", build_head)
    result = fit(extractor, LEGACY, cfg, _images(6, 0), _images(2, 1), progress=progress)
    assert result.summary["epochs_run"] == 5 and result.summary["best_epoch"] == 3
    assert result.summary["best_loss"] == 3.0
    final = result.model.head.state_dict()
    assert all(torch.equal(final[k], v) for k, v in snapshots[3].items())
    assert not all(torch.equal(final[k], v) for k, v in snapshots[5].items())


def test_fused_score_reference_forward_equals_fast_path(fused):
    """The global term through the fast path (pooled means rebuilt from RegionalMaps in the
    reference channel order) equals the nn.Module reference forward."""
    from dfr_core.inference import forward_batch
    from dfr_core.preprocess import normalize_batch

    model = fused.model.eval()
    test = _images(3, 9)
    with torch.no_grad():
        ref = model(normalize_batch(torch.from_numpy(test)))
    fast = forward_batch(model, test)
    torch.testing.assert_close(fast.score, ref.score, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.max_score, ref.max_score, rtol=1e-4, atol=1e-6)
