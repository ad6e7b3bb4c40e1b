"""Image-score terms: how an anomaly map and pooled features become one image score.

The paper's image score is the maximum of the map, which one noisy position of a good image can
raise. This module holds the alternatives measured in BENCHMARKS.md: a robust aggregation of the
map (mean of its top k %), a global term (Mahalanobis distance of the image's pooled standardised
features to a Gaussian fitted on the training images: catches large, low-contrast defects that
local reconstruction misses), and a per-model normalisation of each term on held-out normal
images so that terms can be added and scores compared across product lines.

All functions are deterministic (no sampling) and pure torch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

#: Quantiles of held-out normal images' scores mapping a term to 0 and 1: (s - q_lo) / (q_hi - q_lo)
NORM_QUANTILES = (0.9, 0.995)


class ScoreTerms(NamedTuple):
    """Raw per-image terms before normalisation and fusion: (B,) each."""

    max_score: torch.Tensor  # maximum of the map (the paper's image score)
    local: torch.Tensor  # the configured aggregation of the map
    global_distance: torch.Tensor | None  # Mahalanobis distance of pooled features, or None


def aggregate(maps: torch.Tensor, method: str, topk_fraction: float) -> torch.Tensor:
    """(B, H, W) maps -> (B,) scores: 'max', or 'topk_mean' (mean of the top fraction)."""
    flat = maps.flatten(1)
    if method == "max":
        return flat.amax(dim=1)
    if method == "topk_mean":
        k = max(1, min(flat.shape[1], round(flat.shape[1] * topk_fraction)))
        return flat.topk(k, dim=1).values.mean(dim=1)
    raise ValueError(f"unknown image_score {method!r}")


def pooled(z: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) standardised features -> (B, C) mean over positions (the global descriptor)."""
    return z.float().mean(dim=(2, 3))


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, precision and shrinkage of the Ledoit-Wolf covariance of the (N, C) rows x.

    Shrinks towards a scaled identity with the analytic optimal weight (Ledoit & Wolf 2004), so
    the covariance is well conditioned even with fewer images than channels. float64 inside.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, C) matrix, got {tuple(x.shape)}")
    x = x.double()
    n, p = x.shape
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / n
    mu = torch.trace(cov) / p
    eye = torch.eye(p, dtype=x.dtype)
    d2 = (cov - mu * eye).pow(2).sum()
    # b2 = mean over rows of ||x_i x_i^T - S||_F^2 / n, expanded so no (n, p, p) tensor is built
    sq = xc.pow(2).sum(dim=1)
    b2 = ((sq.pow(2).sum() / n) - cov.pow(2).sum()) / n
    shrink = float((torch.clamp(b2, min=0.0) / d2).clamp(max=1.0)) if d2 > 0 else 1.0
    shrunk = (1.0 - shrink) * cov + shrink * mu.clamp(min=1e-12) * eye
    return mean.float(), torch.linalg.inv(shrunk).float(), shrink


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(B, C) rows -> (B,) Mahalanobis distances to (mean, precision)."""
    d = x.float() - mean
    return ((d @ precision) * d).sum(dim=1).clamp(min=0.0).sqrt()


def quantile_scale(values: torch.Tensor) -> torch.Tensor:
    """(2,) = the NORM_QUANTILES of held-out normal values (the high one strictly larger)."""
    v = values.double().flatten()
    if v.numel() == 0:
        raise ValueError("score normalisation needs at least one held-out normal image")
    lo, hi = (float(torch.quantile(v, q)) for q in NORM_QUANTILES)
    hi = max(hi, lo + max(abs(lo), 1.0) * 1e-6)
    return torch.tensor([lo, hi], dtype=torch.float32)


def normalise(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Affine map of a term by its stored (q_lo, q_hi): normal images' q_lo -> 0, q_hi -> 1."""
    return (values - scale[0]) / (scale[1] - scale[0])
