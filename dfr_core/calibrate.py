"""Thresholds calibrated on held-out normal images at target false-positive rates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dfr_core.config import CalibrationConfig
from dfr_core.geometry import TilePlan
from dfr_core.inference import ImageOutput, forward_batch, forward_images
from dfr_core.model import AnomalyOutput, DFRModel, concat_outputs
from dfr_core.precision import PrecisionSpec


@dataclass(frozen=True)
class Calibration:
    """Raw-score thresholds; mask = map > pixel_threshold, anomalous = score > image_threshold."""

    pixel_threshold: float
    image_threshold: float
    pixel_fpr: float
    image_fpr: float
    n_images: int
    method: str = "quantile of anomaly-map values / image scores on held-out normal images"
    #: the precision the maps were computed at (PrecisionSpec.to_dict(); None in older models:
    #: fp32). Scoring runs at exactly this precision or refuses (dfr_core.precision).
    precision: dict[str, Any] | None = None
    #: threshold of the raw max-of-map score at image_fpr (None in format-1 models, whose image
    #: score was the max of the map: there image_threshold is that threshold)
    max_threshold: float | None = None

    @property
    def precision_spec(self) -> PrecisionSpec:
        return PrecisionSpec.from_dict(self.precision)


@torch.no_grad()
def compute_maps(
    model: DFRModel,
    images: np.ndarray,
    device: torch.device | None = None,
    batch_size: int = 8,
    precision: PrecisionSpec | None = None,
) -> AnomalyOutput:
    """Anomaly maps and scores of (N, S, S, 3) uint8 images, returned on the CPU, through the
    shared batched forward at ``precision`` (default: the model's own, fp32 unless loaded from a
    reduced-precision calibration)."""
    device = device or torch.device("cpu")
    model.to(device).eval()
    outs = []
    for i in range(0, len(images), batch_size):
        outs.append(forward_batch(model, images[i : i + batch_size], precision))
    return concat_outputs(outs)


def upper_quantile(values: np.ndarray, fpr: float) -> float:
    """Smallest observed value v with fraction(values > v) <= fpr."""
    flat = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if flat.size == 0:
        raise ValueError("cannot calibrate on zero values")
    k = int(np.ceil(flat.size * (1.0 - fpr))) - 1
    return float(flat[min(max(k, 0), flat.size - 1)])


def calibrate_outputs(out: AnomalyOutput, config: CalibrationConfig) -> Calibration:
    """Thresholds from maps/scores already computed on normal images."""
    return Calibration(
        pixel_threshold=upper_quantile(out.anomaly_map.numpy(), config.pixel_fpr),
        image_threshold=upper_quantile(out.score.numpy(), config.image_fpr),
        pixel_fpr=config.pixel_fpr,
        image_fpr=config.image_fpr,
        n_images=int(out.score.numel()),
        max_threshold=(
            None
            if out.max_score is None
            else upper_quantile(out.max_score.numpy(), config.image_fpr)
        ),
    )


#: Most map values the pixel threshold of per-image maps (tiled models: 2k x 2k each) is taken
#: from; beyond it every image's values are thinned by one common stride (deterministic).
MAX_CALIBRATION_PIXELS = 20_000_000


def calibrate_image_outputs(outs: Sequence[ImageOutput], config: CalibrationConfig) -> Calibration:
    """Thresholds from per-image outputs of any sizes (`forward_images`)."""
    if not outs:
        raise ValueError("cannot calibrate on zero images")
    total = sum(o.anomaly_map.numel() for o in outs)
    stride = max(1, math.ceil(total / MAX_CALIBRATION_PIXELS))
    values = np.concatenate([o.anomaly_map.numpy().ravel()[::stride] for o in outs])
    return Calibration(
        pixel_threshold=upper_quantile(values, config.pixel_fpr),
        image_threshold=upper_quantile(np.array([o.score for o in outs]), config.image_fpr),
        pixel_fpr=config.pixel_fpr,
        image_fpr=config.image_fpr,
        n_images=len(outs),
        max_threshold=upper_quantile(np.array([o.max_score for o in outs]), config.image_fpr),
    )


def _outputs_of(
    model: DFRModel,
    images: np.ndarray | Sequence[tuple[np.ndarray, TilePlan]],
    device: torch.device | None,
    spec: PrecisionSpec,
) -> AnomalyOutput | list[ImageOutput]:
    """Untiled inputs (an array, or prepared images of an untiled model): today's stacked
    forward; a tiled model's prepared images: per-image stitched outputs."""
    if isinstance(images, np.ndarray):
        return compute_maps(model, images, device, precision=spec)
    if model.config.tile is None:
        stacked = np.concatenate([tiles for tiles, _ in images])
        return compute_maps(model, stacked, device, precision=spec)
    model.to(device or torch.device("cpu")).eval()
    return forward_images(model, images, 8, spec)


#: The backbone's precision under a reduced-precision head unless ``calibrate`` is told
#: otherwise: fp32, for every model. A bf16 backbone moves the scores beyond the parity criterion
#: (AUROC within 0.002 of fp32) on Magnetic-tile with and without the score's global term (image
#: AUROC -0.011 with it, whose Mahalanobis distance amplifies the features' rounding; +0.005
#: without it, as the paper's configuration scores), while a bf16 or int8 head on an fp32
#: backbone stays within the criterion on both shared datasets (`benchmarks/precision_parity.py`,
#: with and without ``--global-weight 0``). A bf16 backbone is an explicit choice
#: (``backbone="bf16"``): VGG19's backbone 1.7-1.9x faster (`benchmarks/speed.py`), at that
#: cost in parity.
DEFAULT_BACKBONE = "fp32"


def calibrate(
    model: DFRModel,
    normal_images: np.ndarray | Sequence[tuple[np.ndarray, TilePlan]],
    config: CalibrationConfig | None = None,
    device: torch.device | None = None,
    precision: str = "fp32",
    backbone: str | None = None,
) -> Calibration:
    """Calibrate on normal images the model was not trained on (e.g. the held-out slice).

    ``precision`` (fp32, bf16, fp16; int8 on CPU) is the precision the thresholds are
    computed, recorded and later enforced at; the model's eval precision is set to it.
    ``backbone``: the backbone's precision (default: DEFAULT_BACKBONE). ``normal_images``:
    model inputs (N, H, W, 3) or `dfr_core.geometry.prepare_image` outputs; a tiled model is
    calibrated on the stitched, smoothed maps of whole images (what scoring thresholds).
    """
    if len(normal_images) == 0:
        raise ValueError("calibration needs at least one held-out normal image")
    backbone = backbone or DEFAULT_BACKBONE
    spec = PrecisionSpec.for_device(precision, device or torch.device("cpu"), backbone)
    out = _outputs_of(model, normal_images, device, spec)
    model.precision = spec
    config = config or CalibrationConfig()
    cal = (
        calibrate_outputs(out, config)
        if isinstance(out, AnomalyOutput)
        else calibrate_image_outputs(out, config)
    )
    return dataclasses.replace(cal, precision=spec.to_dict())
