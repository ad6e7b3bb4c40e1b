"""The precision contract: thresholds hold at the precision they were calibrated at.

model.json records it (in the calibration block); loading restores it; the shared forward runs
at it; the scoring actor refuses a model whose reduced precision was calibrated on another
device kind (its rows become model_error rows), never mixing precisions silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dfr_core.artifact import CONFIG_FILE, load_model, read_metadata, save_model
from dfr_core.calibrate import calibrate, compute_maps
from dfr_core.config import ModelConfig
from dfr_core.geometry import prepare_image
from dfr_core.inference import extract, to_model_input
from dfr_core.model import DFRHead, DFRModel, build_extractor
from dfr_core.precision import Precision, PrecisionError, PrecisionSpec
from pipeline import registry
from pipeline.io_stages import Prepared
from pipeline.score_stages import ScoringActor, ScoringConfig

SIZE = 64
LINE = "plate"


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model() -> DFRModel:
    config = ModelConfig(image_size=SIZE)
    extractor = build_extractor(config).eval()
    torch.manual_seed(0)
    head = DFRHead(config, extractor.channels, 8).eval()
    head.set_feature_stats(torch.rand(extractor.channels), torch.rand(extractor.channels) + 0.5)
    return DFRModel(extractor, head).eval()


def test_spec_rules():
    cpu = torch.device("cpu")
    assert PrecisionSpec.from_dict(None) == PrecisionSpec()  # older models: fp32
    assert PrecisionSpec.for_device("fp32", cpu).device_kind is None
    bf16 = PrecisionSpec.for_device("bf16", cpu)
    assert (bf16.dtype, bf16.device_kind) == (Precision.BF16, "cpu")
    assert PrecisionSpec.from_dict(bf16.to_dict()) == bf16
    with pytest.raises(PrecisionError, match="calibrated at bf16 on cuda:NVIDIA H200"):
        PrecisionSpec(Precision.BF16, "cuda:NVIDIA H200").check(cpu)
    with pytest.raises(PrecisionError, match="fp16 is not supported on CPU"):
        PrecisionSpec.for_device("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        PrecisionSpec.for_device("int4", cpu)


def _assert_split_spec(spec: PrecisionSpec, head: str, backbone: str, dtypes: tuple) -> None:
    """A CPU spec whose backbone's precision differs from its head's: recorded, restored,
    resolved to torch dtypes and described as such."""
    assert spec.to_dict() == {"dtype": head, "device_kind": "cpu", "backbone": backbone}
    assert PrecisionSpec.from_dict(spec.to_dict()) == spec
    assert (spec.torch_dtype, spec.backbone_dtype) == dtypes
    assert spec.describe() == f"{head}@cpu (backbone {backbone})"


def test_int8_head_rules():
    """int8 is a head precision on CPU only; its backbone's precision (fp32 or bf16) is always
    recorded, since a backbone cannot run at int8."""
    cpu = torch.device("cpu")
    spec = PrecisionSpec.for_device("int8", cpu, backbone="bf16")
    _assert_split_spec(spec, "int8", "bf16", (torch.int8, torch.bfloat16))
    with pytest.raises(ValueError, match="an int8 head needs its backbone's precision"):
        PrecisionSpec.for_device("int8", cpu)
    with pytest.raises(ValueError, match="fp32 or bf16, not fp16"):
        PrecisionSpec(Precision.INT8, "cpu", Precision.FP16)
    meta = torch.device("meta")  # any non-CPU device (no GPU needed to check the refusal)
    with pytest.raises(PrecisionError, match="int8 runs on CPU only, not on meta"):
        PrecisionSpec(Precision.INT8, "meta", Precision.FP32).check(meta)


def test_backbone_precision_rules():
    cpu = torch.device("cpu")
    split = PrecisionSpec.for_device("bf16", cpu, backbone="fp32")
    _assert_split_spec(split, "bf16", "fp32", (torch.bfloat16, torch.float32))
    # the same precision spelled out is the same spec (and model.json keeps its old form)
    same = PrecisionSpec.for_device("bf16", cpu, backbone="bf16")
    assert same == PrecisionSpec(Precision.BF16, "cpu") and "backbone" not in same.to_dict()
    assert same.backbone_dtype == torch.bfloat16  # older bf16 models: the backbone in bf16
    with pytest.raises(ValueError, match="backbone precision fp16 under a bf16 head"):
        PrecisionSpec(Precision.BF16, "cpu", Precision.FP16)


def test_recorded_restored_and_enforced(model, tmp_path):
    normal = _images(4, 1)
    cal32 = calibrate(model, normal)
    assert cal32.precision == {"dtype": "fp32", "device_kind": None}
    cal16 = calibrate(model, normal, precision="bf16")
    # the model's score has a global term: its backbone stays fp32 (calibrate's default)
    assert model.config.global_weight > 0
    assert cal16.precision == {"dtype": "bf16", "device_kind": "cpu", "backbone": "fp32"}
    assert model.precision.dtype is Precision.BF16  # predict now runs where it was calibrated
    assert cal16.pixel_threshold != cal32.pixel_threshold  # really computed at bf16
    save_model(model, tmp_path, cal16)
    meta = read_metadata(tmp_path)
    assert meta["calibration"]["precision"] == cal16.precision
    loaded = load_model(tmp_path).model
    assert loaded.precision == PrecisionSpec(Precision.BF16, "cpu", Precision.FP32)
    images = _images(2, 2)
    bf16 = compute_maps(model, images, precision=loaded.precision)
    fp32 = compute_maps(model, images, precision=PrecisionSpec())
    again = compute_maps(loaded, images)  # no precision given: the model's own
    torch.testing.assert_close(again.anomaly_map, bf16.anomaly_map, rtol=0, atol=0)
    assert not torch.equal(again.anomaly_map, fp32.anomaly_map)
    predicted = loaded.predict(list(images))
    torch.testing.assert_close(predicted.score, bf16.score, rtol=0, atol=0)


def test_bf16_head_keeps_the_backbone_exact(model):
    """Under the default bf16 calibration, the backbone pass (hence the pooled features of the
    global term) is bit-identical to fp32's; only the head runs in bf16. A bf16 backbone
    ("bf16-all") really differs."""
    x = to_model_input(_images(2, 6), torch.device("cpu"))
    fp32 = extract(model.extractor, x, PrecisionSpec())
    split = extract(model.extractor, x, PrecisionSpec(Precision.BF16, "cpu", Precision.FP32))
    full = extract(model.extractor, x, PrecisionSpec(Precision.BF16, "cpu"))
    torch.testing.assert_close(split.fine, fp32.fine, rtol=0, atol=0)
    assert not torch.equal(full.fine, fp32.fine)
    images = _images(2, 6)
    head_only = compute_maps(
        model, images, precision=PrecisionSpec(Precision.BF16, "cpu", Precision.FP32)
    )
    exact = compute_maps(model, images, precision=PrecisionSpec())
    assert not torch.equal(head_only.anomaly_map, exact.anomaly_map)  # the head is bf16


def test_the_backbone_stays_fp32_by_default_and_bf16_is_explicit():
    """Whatever the score (here without a global term, as the paper's configuration scores),
    a reduced-precision head keeps an fp32 backbone unless a bf16 one is asked for."""
    config = ModelConfig(image_size=SIZE, global_weight=0.0)
    extractor = build_extractor(config).eval()
    head = DFRHead(config, extractor.channels, 8).eval()
    model = DFRModel(extractor, head).eval()
    normal = _images(3, 7)
    for precision in ("bf16", "int8"):
        cal = calibrate(model, normal, precision=precision)
        assert cal.precision == {"dtype": precision, "device_kind": "cpu", "backbone": "fp32"}
    cal = calibrate(model, normal, precision="bf16", backbone="bf16")
    assert cal.precision == {"dtype": "bf16", "device_kind": "cpu"}  # the older spelling
    cal = calibrate(model, normal, precision="int8", backbone="bf16")
    assert cal.precision == {"dtype": "int8", "device_kind": "cpu", "backbone": "bf16"}


def test_int8_calibration_is_recorded_and_computed_at_int8(model, tmp_path):
    normal = _images(4, 1)
    cal32 = calibrate(model, normal)
    cal8 = calibrate(model, normal, precision="int8")
    assert cal8.precision == {"dtype": "int8", "device_kind": "cpu", "backbone": "fp32"}
    assert cal8.pixel_threshold != cal32.pixel_threshold  # really computed at int8
    save_model(model, tmp_path, cal8)
    loaded = load_model(tmp_path).model
    assert loaded.precision == PrecisionSpec(Precision.INT8, "cpu", Precision.FP32)
    images = _images(2, 2)
    int8 = compute_maps(loaded, images)  # the model's own precision
    fp32 = compute_maps(model, images, precision=PrecisionSpec())
    assert not torch.equal(int8.anomaly_map, fp32.anomaly_map)
    torch.testing.assert_close(int8.anomaly_map, fp32.anomaly_map, rtol=2e-2, atol=1e-3)


def test_older_model_without_the_field_is_fp32(model, tmp_path):
    save_model(model, tmp_path, calibrate(model, _images(3, 3)))
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    del meta["calibration"]["precision"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_model(tmp_path)
    assert loaded.calibration.precision_spec == PrecisionSpec()
    assert loaded.model.precision == PrecisionSpec()


def _actor(tmp_path: Path, model: DFRModel, precision: dict) -> ScoringActor:
    directory = tmp_path / "artifact"
    cal = calibrate(model, _images(3, 4))
    cal = type(cal)(**{**cal.__dict__, "precision": precision})
    save_model(model, directory, cal)
    models = str(tmp_path / "models")
    version = registry.publish(directory, models, LINE)
    config = ScoringConfig(
        models_uri=models, models={LINE: version}, cache_dir=str(tmp_path / "cache"),
        options=None, output_uri=str(tmp_path / "out"), run_date="2024-01-01", run_id="r",
        masks="none", heatmaps=False, torch_threads=1, write_threads=1,
    )  # fmt: skip
    return ScoringActor(config)


def test_scoring_actor_refuses_a_precision_from_another_device_kind(model, tmp_path):
    actor = _actor(tmp_path, model, {"dtype": "bf16", "device_kind": "cuda:NVIDIA H200"})
    assert actor._model(LINE) is None
    assert "calibrated at bf16 on cuda:NVIDIA H200" in actor.failed[LINE]


@pytest.mark.parametrize(
    ("dtype", "backbone"), [("bf16", None), ("bf16", "fp32"), ("int8", "fp32"), ("int8", "bf16")]
)
def test_scoring_actor_scores_at_the_calibrated_precision(model, tmp_path, dtype, backbone):
    spec = PrecisionSpec(Precision(dtype), "cpu", backbone and Precision(backbone))
    actor = _actor(tmp_path, model, spec.to_dict())
    images = _images(3, 5)
    prepared = {i: Prepared(*prepare_image(ModelConfig(image_size=SIZE), img))
                for i, img in enumerate(images)}  # fmt: skip
    assert actor._model(LINE) is not None
    scored = actor._score_chunk([0, 1, 2], [LINE] * 3, prepared, (
        actor.lines[LINE].extractor_key, actor.lines[LINE].precision))  # fmt: skip
    assert actor.lines[LINE].precision == spec
    # a bf16 backbone is stored at bf16 in the actor (autocast's maps, bit for bit, below)
    (extractor,) = actor.extractors.values()
    assert extractor.weights_dtype == spec.backbone_dtype
    expect = compute_maps(model, images, precision=spec)
    assert [scored[i].score for i in range(3)] == pytest.approx(expect.score.tolist(), abs=0)
