"""The one batched eval forward: uint8 images -> anomaly maps and scores, at a given precision.

`DFRModel.predict`, calibration/evaluation (`dfr_core.calibrate.compute_maps`) and the scoring
actor all go through `extract` + `head_output`, so a threshold calibrated by one is valid for the
others. The backbone runs once per batch (`extract`); each product line's head then runs on its
own rows of it (`head_output`). Both use the exact fast path of `dfr_core.fastpath` and the
precision contract of `dfr_core.precision`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from dfr_core.anomaly import AnomalyOutput
from dfr_core.config import ModelConfig
from dfr_core.fastpath import RegionalMaps, extract_regional, folded_head, pooled_means
from dfr_core.features import FeatureExtractor
from dfr_core.precision import PrecisionSpec, exact_fp32
from dfr_core.preprocess import normalize_batch


class DFRHead(Protocol):
    """What the forward needs of a head (dfr_core.model.DFRHead; structural, so that this module
    does not import dfr_core.model, which imports it)."""

    config: ModelConfig

    def from_error_grid(
        self, grid: torch.Tensor, pooled_feats: torch.Tensor | None = None
    ) -> AnomalyOutput: ...

    def parameters(self): ...


class DFRModel(Protocol):
    """What the forward needs of a model (dfr_core.model.DFRModel)."""

    head: DFRHead
    extractor: FeatureExtractor
    precision: PrecisionSpec


def to_model_input(images: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) fp32 on ``device``, channels_last (the
    layout oneDNN/cuDNN convolutions run fastest in; the values are the same)."""
    x = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    if device.type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return normalize_batch(x).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def extract(extractor: FeatureExtractor, x: torch.Tensor, precision: PrecisionSpec) -> RegionalMaps:
    """One backbone pass at ``precision`` (checked against x's device first)."""
    precision.check(x.device)
    with exact_fp32(x.device):
        return extract_regional(extractor, x, precision.torch_dtype)


@torch.no_grad()
def head_output(
    head: DFRHead,
    extractor: FeatureExtractor,
    maps: RegionalMaps,
    precision: PrecisionSpec,
    rows: Sequence[int] | None = None,
) -> AnomalyOutput:
    """One head on (a subset ``rows`` of) a batch's maps: the error grid at ``precision``, then
    the head's map/score definition in fp32."""
    if rows is not None:
        index = torch.as_tensor(list(rows), device=maps.fine.device)
        maps = RegionalMaps(
            maps.fine.index_select(0, index), tuple(m.index_select(0, index) for m in maps.coarse)
        )
    with exact_fp32(maps.fine.device):
        grid = folded_head(head, extractor, precision.torch_dtype).error_grid(maps)
        pooled = pooled_means(extractor, maps) if head.config.global_weight > 0 else None
        return head.from_error_grid(grid.float(), pooled)


def forward_batch(
    model: DFRModel, images: np.ndarray | torch.Tensor, precision: PrecisionSpec | None = None
) -> AnomalyOutput:
    """(B, S, S, 3) uint8 images already at the model's size -> maps and scores (on device)."""
    precision = precision or model.precision
    device = next(model.head.parameters()).device
    x = to_model_input(images, device)
    return head_output(
        model.head, model.extractor, extract(model.extractor, x, precision), precision
    )
