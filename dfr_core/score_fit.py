"""Fitting the image-score terms after the autoencoder: the global Gaussian and the scales.

Split from dfr_core.train (which re-exports these names): the global term's Gaussian is fitted
on the training bank (rows are images, or tiles for a tiled model), the score scales on held-out
normal images, per model input (untiled) or per stitched image (tiled, dfr_core.tiling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from dfr_core.config import TrainConfig
from dfr_core.device import inference_mode
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRHead, DFRModel
from dfr_core.preprocess import normalize_batch
from dfr_core.scoring import ScoreTerms, ledoit_wolf, pooled, quantile_scale
from dfr_core.train_inputs import TrainImages, model_inputs, tiled_image_terms


@torch.no_grad()
def pooled_bank(head: DFRHead, bank: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, C) mean over cached positions of each image's standardised features."""
    rows = [pooled(head.standardize(c.float()[..., None].to(device))).cpu() for c in bank.split(16)]
    return torch.cat(rows)


def feature_batches(
    extractor: FeatureExtractor, images: np.ndarray, batch_size: int, device: torch.device
) -> Iterator[torch.Tensor]:
    """Regional features of (N, S, S, 3) uint8 images, batch by batch, float32 on `device`."""
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size]))
        with inference_mode(device):
            feats = extractor(normalize_batch(batch.to(device)))
        yield feats.float()


@torch.no_grad()
def fit_global_term(head: DFRHead, bank: torch.Tensor, device: torch.device) -> dict:
    """The training images' pooled-feature Gaussian (Ledoit-Wolf), for global_weight > 0."""
    if head.config.global_weight <= 0:
        return {}
    mean, precision, shrink = ledoit_wolf(pooled_bank(head, bank, device))
    head.set_global_gaussian(mean.to(device), precision.to(device))
    return {"global_shrinkage": shrink}


@torch.no_grad()
def fit_score_scales(head: DFRHead, batches: Iterable[torch.Tensor]) -> dict:
    """Each term's (q_lo, q_hi) on held-out normal images' features, for score_norm='quantile'.

    Takes feature batches (not images) so a benchmark can refit the scales of another score
    configuration from cached features; deterministic.
    """
    if head.config.score_norm != "quantile":
        return {}
    return scales_from_terms(head, [head.terms(feats)[1] for feats in batches])


def scales_from_terms(head: DFRHead, terms: list[ScoreTerms]) -> dict:
    """Set each term's (q_lo, q_hi) from held-out normal images' raw terms (score_norm
    'quantile'); the summary dict for the training record."""
    if head.config.score_norm != "quantile":
        return {}
    local = quantile_scale(torch.cat([t.local.cpu() for t in terms]))
    glob = None
    if head.config.global_weight > 0:
        glob = quantile_scale(torch.cat([t.global_distance.cpu() for t in terms]))
    device = head.feature_mean.device
    head.set_score_scales(local.to(device), None if glob is None else glob.to(device))
    return {
        "local_scale": local.tolist(),
        "global_scale": None if glob is None else glob.tolist(),
        "scale_images": sum(len(t.local) for t in terms),
    }


def score_scales(
    model: DFRModel, norm_images: TrainImages, cfg: TrainConfig, device: torch.device
) -> dict:
    """Score scales on held-out normal images: per input (untiled) or per stitched image."""
    head, extractor = model.head, model.extractor
    if head.config.tile is None:
        inputs = model_inputs(norm_images, head.config, cfg, extractor.channels, cfg.seed)
        return fit_score_scales(
            head, feature_batches(extractor, inputs, cfg.feature_batch_size, device)
        )
    if head.config.score_norm != "quantile":
        return {}
    return scales_from_terms(head, tiled_image_terms(model, norm_images, cfg.feature_batch_size))
