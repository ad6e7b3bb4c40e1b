"""Training levers: fit_head on cached banks (what benchmarks/accuracy_levers.py relies on) and
the learning-rate schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfr_core.config import ModelConfig, TrainConfig
from dfr_core.model import build_extractor
from dfr_core.train import extract_bank, fit, fit_head

SIZE = 64
SUPERSET = ("relu1_1", "relu2_1", "relu3_1")
SUBSET = ("relu1_1", "relu3_1")  # channels 0..63 and 192..447 of the superset
TRAIN = TrainConfig(epochs=2, batch_size=2, positions_per_image=32, patience=0, seed=0)


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 255, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


def _config(layers: tuple[str, ...]) -> ModelConfig:
    return ModelConfig(backbone="vgg19", layers=layers, image_size=SIZE, global_weight=0.0)


def test_fit_head_on_a_superset_slice_equals_fit_on_the_subset():
    """A layer subset's features are a channel slice of a superset's, so a head trained on the
    slice is the head `fit` trains for those layers (same seed, same weights)."""
    torch.manual_seed(0)
    sub_extractor = build_extractor(_config(SUBSET), allow_random_init=True)
    torch.manual_seed(0)
    super_extractor = build_extractor(_config(SUPERSET), allow_random_init=True)
    train, val = _images(4, 0), _images(2, 1)
    ref = fit(sub_extractor, _config(SUBSET), TRAIN, train, val).model.head
    gen = torch.Generator().manual_seed(0)
    bank = extract_bank(super_extractor, train, TRAIN, torch.device("cpu"), gen)
    val_bank = extract_bank(super_extractor, val, TRAIN, torch.device("cpu"), gen)
    idx = torch.cat([torch.arange(0, 64), torch.arange(192, 448)])
    got = fit_head(_config(SUBSET), TRAIN, bank[:, idx], val_bank[:, idx], torch.device("cpu"))
    for name, value in ref.state_dict().items():
        if name.endswith("_scale"):  # score scales: fitted by `fit` after training
            continue
        torch.testing.assert_close(got.head.state_dict()[name], value, rtol=1e-4, atol=1e-5)


def test_cosine_schedule_decays_the_learning_rate_and_unknown_schedules_are_refused():
    bank = torch.randn(4, 8, 16).half()
    seen = []
    cfg = TrainConfig(
        epochs=4, batch_size=2, positions_per_image=8, lr=1e-3, lr_schedule="constant", patience=0
    )
    cosine = TrainConfig(**{**cfg.__dict__, "lr_schedule": "cosine"})
    model_cfg = ModelConfig(global_weight=0.0, latent_dim=3)
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Adam, "step", step)
        fit_head(model_cfg, cfg, bank, None, torch.device("cpu"))
        constant, seen[:] = list(seen), []
        fit_head(model_cfg, cosine, bank, None, torch.device("cpu"))
    assert set(constant) == {1e-3}
    assert seen[0] == pytest.approx(1e-3) and seen == sorted(seen, reverse=True)
    assert seen[-1] < 0.2e-3
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        TrainConfig(lr_schedule="step")


def test_a_model_saved_with_default_layers_keeps_the_layers_it_used():
    """model_config layers [] meant "the backbone's default when written": loading resolves it to
    the layers recorded beside it, so changing a backbone's default layers cannot change (or
    break) an existing model."""
    from dfr_core.artifact import model_config_of
    from dfr_core.config import to_dict

    used = ["features.1", "features.3", "features.6", "features.10", "features.13"]
    for version in (1, 2):
        stored = to_dict(ModelConfig(layers=()))
        if version == 1:
            stored = {k: v for k, v in stored.items() if k not in ("image_score", "global_weight")}
        meta = {
            "format_version": version,
            "model_config": stored,
            "backbone": {"name": "mobilenet_v2", "layers": used, "channels": 232},
        }
        assert model_config_of(meta).layers == tuple(used)


RUN = "layers=features.1+features.3;epochs=2;positions_per_image=32"


def _lever_rows(capsys, argv: list[str]) -> dict[str, list[str]]:
    """Run benchmarks/accuracy_levers.py's main; its table rows by config label."""
    from benchmarks import accuracy_levers

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.argv", ["accuracy_levers.py", *argv])
        accuracy_levers.main()
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        if line.startswith("| mvtec "):
            cells = line.split(" | ")
            if len(cells) == 16:  # a --rescore label "run | change" holds one " | "
                cells[1:3] = [" | ".join(cells[1:3])]
            rows[cells[1]] = cells
    return rows, out


def test_levers_script_rescores_a_saved_head_with_score_settings(tmp_path, capsys):
    """--rescore of score settings needs no retraining: the head is saved and reloaded (same
    rows), an image-score-only change keeps the maps' pixel metrics, and the quantile
    normalisation alone (no global term) is affine, so it changes no metric."""
    from pipeline.demo.synthetic import SyntheticSpec, write_mvtec_dataset

    spec = SyntheticSpec(
        product_lines=("metal_plate",), n_train=20, n_test_good=4, n_test_defect=6, size=64
    )
    root = write_mvtec_dataset(tmp_path / "data", spec)["metal_plate"]
    (tmp_path / "mvtec").symlink_to(root)  # the row's dataset column is the root's name
    argv = [
        "--data", str(tmp_path / "mvtec"), "--size", "64", "--superset", "features.1+features.3",
        "--cache", str(tmp_path / "cache"), "--heads", str(tmp_path / "heads"),
        "--run", RUN, "--rescore", "image_score=max",
        "--rescore", "global_weight=0", "--rescore", "score_norm=none;global_weight=0",
        "--rescore", "smoothing_sigma=0", "--rescore", "map_global=1",
    ]  # fmt: skip
    first, out = _lever_rows(capsys, argv)
    assert "head loaded" not in out
    base = first[RUN]
    assert len(first) == 6
    by_change = {label.split(" | ", 1)[1]: row for label, row in first.items() if " | " in label}
    assert by_change["image_score=max"][3:5] == base[3:5]  # pixel AUROC, PRO: same maps
    local = by_change["global_weight=0"]
    assert by_change["score_norm=none;global_weight=0"][2:] == local[2:]
    assert by_change["map_global=1"][2] == base[2]  # scores unchanged, maps changed
    again, out = _lever_rows(capsys, argv)
    assert "head loaded" in out
    for label, row in first.items():
        assert again[label][:12] == row[:12]  # all but d / epochs / fit s / ms / KB
