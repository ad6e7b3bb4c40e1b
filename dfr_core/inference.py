"""The one batched eval forward: uint8 images -> anomaly maps and scores, at a given precision.

`DFRModel.predict`, calibration/evaluation (`dfr_core.calibrate.compute_maps`) and the scoring
actor all go through `extract` + `head_output` (or, per image and for tiled models,
`score_images` / `forward_images`), so a threshold calibrated by one is valid for the others.
The backbone runs once per batch (`extract`); each product line's head then runs on its own
rows of it (`head_output`). Both use the exact fast path of `dfr_core.fastpath` and the
precision contract of `dfr_core.precision`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple, Protocol

import numpy as np
import torch

from dfr_core.anomaly import AnomalyOutput
from dfr_core.config import ModelConfig
from dfr_core.device import prepare_for_device
from dfr_core.fastpath import RegionalMaps, extract_regional, folded_head, pooled_means
from dfr_core.features import FeatureExtractor
from dfr_core.geometry import TilePlan
from dfr_core.precision import PrecisionSpec, exact_fp32
from dfr_core.preprocess import normalize_batch
from dfr_core.tiling import ImageOutput, TiledHead, tiled_image_output


class DFRHead(TiledHead, Protocol):
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


def prepare_extractor(
    extractor: FeatureExtractor, device: torch.device, precision: PrecisionSpec
) -> FeatureExtractor:
    """An extractor made ready to score at ``precision`` only (a scoring actor keeps one per
    backbone and backbone precision): on the device, channels_last, and, for a bf16/fp16
    backbone, its weights stored at that precision (`FeatureExtractor.cast_backbone`: the same
    maps as autocast, at half the weights' memory and no per-batch weight copies); an fp32
    backbone on the CPU runs its wide 3x3 convolutions as Winograd F(2x2, 3x3)
    (`dfr_core.winograd`: the same maps to fp32 rounding, 2.25x fewer multiply-adds)."""
    extractor = prepare_for_device(extractor.eval(), device)
    if device.type == "cpu" and precision.backbone_dtype == torch.float32:
        extractor.backbone.use_winograd()
    return extractor.cast_backbone(precision.backbone_dtype)


@torch.no_grad()
def extract(extractor: FeatureExtractor, x: torch.Tensor, precision: PrecisionSpec) -> RegionalMaps:
    """One backbone pass at ``precision``'s backbone dtype (checked against x's device first)."""
    precision.check(x.device)
    with exact_fp32(x.device):
        return extract_regional(extractor, x, precision.backbone_dtype)


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
    with exact_fp32(maps.fine.device):
        grid, pooled = _grids(head, extractor, _select(maps, rows), precision)
        return head.from_error_grid(grid, pooled)


def _select(maps: RegionalMaps, rows: Sequence[int] | None) -> RegionalMaps:
    if rows is None:
        return maps
    index = torch.as_tensor(list(rows), device=maps.fine.device)
    return RegionalMaps(
        maps.fine.index_select(0, index), tuple(m.index_select(0, index) for m in maps.coarse)
    )


def _grids(
    head: DFRHead, extractor: FeatureExtractor, maps: RegionalMaps, precision: PrecisionSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, Gh, Gw) fp32 error grids and, for a global term, (B, C) pooled raw features."""
    grid = folded_head(head, extractor, precision.torch_dtype).error_grid(maps)
    pooled = pooled_means(extractor, maps) if head.config.global_weight > 0 else None
    return grid.float(), pooled


def _split(out: AnomalyOutput) -> list[ImageOutput]:
    maps, scores, maxes = out.anomaly_map.float().cpu(), out.score.tolist(), out.max_score.tolist()
    return [ImageOutput(maps[j], float(scores[j]), float(maxes[j])) for j in range(len(scores))]


def _finish(
    head: DFRHead, grid: torch.Tensor, pooled: torch.Tensor | None, plans: Sequence[TilePlan]
) -> list[ImageOutput]:
    """Consecutive tiles' grids -> one ImageOutput per plan (untiled: one tile per image)."""
    if head.config.tile is None:
        return _split(head.from_error_grid(grid, pooled))
    outs, start = [], 0
    for plan in plans:
        stop = start + plan.n_tiles
        part = None if pooled is None else pooled[start:stop]
        outs.append(tiled_image_output(head, grid[start:stop], part, plan))
        start = stop
    return outs


@torch.no_grad()
def score_images(
    head: DFRHead,
    extractor: FeatureExtractor,
    maps: RegionalMaps,
    precision: PrecisionSpec,
    plans: Sequence[TilePlan],
    rows: Sequence[int] | None = None,
) -> list[ImageOutput]:
    """One head on (rows of) ONE backbone pass over a batch of tiles -> one output per plan.

    ``plans[j]`` owns the next ``plans[j].n_tiles`` selected rows (an image's tiles are
    consecutive). Untiled models: one row per plan, maps/scores equal to `head_output`'s.
    """
    need = sum(plan.n_tiles for plan in plans)
    have = maps.fine.shape[0] if rows is None else len(rows)
    if need != have:
        raise ValueError(f"score_images: the plans own {need} tiles, the batch has {have}")
    with exact_fp32(maps.fine.device):
        grid, pooled = _grids(head, extractor, _select(maps, rows), precision)
        return _finish(head, grid, pooled, plans)


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


def _images_at_once(
    model: DFRModel, prepared: Sequence[tuple[np.ndarray, TilePlan]], batch_size: int, precision
) -> list[ImageOutput]:
    """Untiled: exactly today's batches of `batch_size` images through `forward_batch`."""
    outs: list[ImageOutput] = []
    for i in range(0, len(prepared), batch_size):
        batch = np.concatenate([tiles for tiles, _ in prepared[i : i + batch_size]])
        outs.extend(_split(forward_batch(model, batch, precision)))
    return outs


class TileGrids(NamedTuple):
    """One image's per-tile error grids (N, Gh, Gw) and pooled raw features (N, C) or None."""

    grids: torch.Tensor
    pooled: torch.Tensor | None
    plan: TilePlan


def iter_tile_grids(
    model: DFRModel,
    prepared: Sequence[tuple[np.ndarray, TilePlan]],
    batch_size: int = 16,
    precision: PrecisionSpec | None = None,
) -> Iterator[TileGrids]:
    """Per image, in order: its tiles' error grids, from backbone passes of at most
    ``batch_size`` tiles shared by consecutive images. An image is yielded as soon as its last
    tile's grid is in, so only the small grids of unfinished images are held."""
    precision = precision or model.precision
    head, extractor = model.head, model.extractor
    device = next(head.parameters()).device
    flat = [(i, k) for i, (tiles, _) in enumerate(prepared) for k in range(len(tiles))]
    grids: list[torch.Tensor] = []
    pooled: list[torch.Tensor] = []
    next_image, held = 0, 0  # first unfinished image; grids held for it and later ones
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        x = to_model_input(np.stack([prepared[i][0][k] for i, k in chunk]), device)
        maps = extract(extractor, x, precision)
        with exact_fp32(device):
            grid, pool = _grids(head, extractor, maps, precision)
        grids.append(grid)
        if pool is not None:
            pooled.append(pool)
        held += len(chunk)
        while next_image < len(prepared) and prepared[next_image][1].n_tiles <= held:
            plan = prepared[next_image][1]
            all_grids = torch.cat(grids)
            all_pooled = torch.cat(pooled) if pooled else None
            part = None if all_pooled is None else all_pooled[: plan.n_tiles]
            yield TileGrids(all_grids[: plan.n_tiles], part, plan)
            grids = [all_grids[plan.n_tiles :]]
            pooled = [] if all_pooled is None else [all_pooled[plan.n_tiles :]]
            held -= plan.n_tiles
            next_image += 1


@torch.no_grad()
def forward_images(
    model: DFRModel,
    prepared: Sequence[tuple[np.ndarray, TilePlan]],
    batch_size: int = 16,
    precision: PrecisionSpec | None = None,
) -> list[ImageOutput]:
    """`dfr_core.geometry.prepare_image` outputs -> one ImageOutput per image.

    Tiled models: `iter_tile_grids`, then each image stitched, smoothed and scored
    (`dfr_core.tiling`). For an untiled model the maps and scores equal `forward_batch`'s on
    batches of ``batch_size`` images.
    """
    precision = precision or model.precision
    if model.head.config.tile is None:
        return _images_at_once(model, prepared, batch_size, precision)
    device = next(model.head.parameters()).device
    outs: list[ImageOutput] = []
    for item in iter_tile_grids(model, prepared, batch_size, precision):
        with exact_fp32(device):
            outs.append(tiled_image_output(model.head, item.grids, item.pooled, item.plan))
    return outs
