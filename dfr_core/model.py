"""DFRModel: frozen regional features + a per-product autoencoder head -> anomaly maps."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dfr_core.anomaly import AnomalyOutput, concat_outputs
from dfr_core.backbones import FeatureBackbone, build_backbone
from dfr_core.cae import CAE
from dfr_core.config import ModelConfig
from dfr_core.features import FeatureExtractor
from dfr_core.geometry import prepare_image
from dfr_core.inference import ImageOutput, forward_batch, forward_images
from dfr_core.precision import PrecisionSpec
from dfr_core.preprocess import resize_image
from dfr_core.scoring import ScoreTerms, aggregate, mahalanobis, normalise


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian truncated at 4 sigma (as scipy's default)."""
    radius = max(1, int(math.ceil(4.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps[:, None]
    # Reflect padding needs pad < size: truncate (and renormalise) the kernel on tiny maps.
    pad_h, pad_w = min(r, maps.shape[-2] - 1), min(r, maps.shape[-1] - 1)
    kw, kh = k[r - pad_w : r + pad_w + 1], k[r - pad_h : r + pad_h + 1]
    x = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w else x
    x = F.conv2d(x, (kw / kw.sum()).view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, pad_h, pad_h), mode="reflect") if pad_h else x
    x = F.conv2d(x, (kh / kh.sum()).view(1, 1, -1, 1))
    return x[:, 0]


class DFRHead(nn.Module):
    """The per-product part: feature standardisation + CAE -> anomaly map.

    Kept separate from the frozen extractor so one scoring actor can run the backbone once per
    batch and apply the small head of each product line to its own rows.
    """

    def __init__(self, config: ModelConfig, channels: int, latent_dim: int) -> None:
        super().__init__()
        self.config = config
        self.cae = CAE(channels, latent_dim)
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))
        # Score-term state exists only when the config uses it, so heads saved without it (the
        # paper's config, format-1 models) load strictly.
        if config.global_weight > 0:
            self.register_buffer("global_mean", torch.zeros(channels))
            self.register_buffer("global_precision", torch.eye(channels))
        if config.score_norm == "quantile":
            self.register_buffer("local_scale", torch.tensor([0.0, 1.0]))
            if config.global_weight > 0:
                self.register_buffer("global_scale", torch.tensor([0.0, 1.0]))

    def set_global_gaussian(self, mean: torch.Tensor, precision: torch.Tensor) -> None:
        """Store the training images' pooled-feature Gaussian (config.global_weight > 0)."""
        self.global_mean.copy_(mean)
        self.global_precision.copy_(precision)

    def set_score_scales(self, local: torch.Tensor, global_: torch.Tensor | None) -> None:
        """Store each term's (q_lo, q_hi) on held-out normal images (score_norm='quantile')."""
        self.local_scale.copy_(local)
        if global_ is not None:
            self.global_scale.copy_(global_)

    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel training statistics (used when feature_norm == 'channel')."""
        self.feature_mean.copy_(mean.view_as(self.feature_mean))
        self.feature_std.copy_(std.clamp(min=1e-6).view_as(self.feature_std))

    def standardize(self, feats: torch.Tensor) -> torch.Tensor:
        if self.config.feature_norm == "channel":
            return (feats - self.feature_mean) / self.feature_std
        return feats

    def error_grid(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-position squared reconstruction error averaged over channels: (B, G, G)."""
        z = self.standardize(feats.float())
        return (self.cae(z) - z).pow(2).mean(dim=1)

    def pooled_standardized(self, pooled_feats: torch.Tensor) -> torch.Tensor:
        """(B, C) position-means of the raw features -> the global descriptor (B, C).

        Standardisation is affine per channel, so standardising the mean equals the mean of the
        standardised map: the fast path (dfr_core.inference) never builds the full map for it.
        """
        if self.config.feature_norm == "channel":
            return (pooled_feats.float() - self.feature_mean.flatten()) / self.feature_std.flatten()
        return pooled_feats.float()

    def upsample_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, Gh, Gw) error grid -> (B, H, W) unsmoothed map at the model input (bilinear)."""
        full = F.interpolate(
            grid[:, None], size=self.config.input_hw, mode="bilinear", align_corners=False
        )
        return full[:, 0]

    def global_distance(self, pooled_feats: torch.Tensor | None) -> torch.Tensor | None:
        """(B,) Mahalanobis distances of (B, C) pooled raw features; None without a global term."""
        if self.config.global_weight <= 0:
            return None
        if pooled_feats is None:
            raise ValueError("this model's score has a global term: pooled features needed")
        z = self.pooled_standardized(pooled_feats)
        return mahalanobis(z, self.global_mean, self.global_precision)

    def map_terms(
        self, full: torch.Tensor, distance: torch.Tensor | None
    ) -> tuple[torch.Tensor, ScoreTerms]:
        """(B, H, W) unsmoothed maps (one model input, or a stitched image) -> the smoothed map
        and the raw terms: smoothing and aggregation happen once, at the map's resolution."""
        cfg = self.config
        amap = gaussian_blur(full, cfg.smoothing_sigma)
        local = aggregate(amap, cfg.image_score, cfg.topk_fraction)
        return amap, ScoreTerms(amap.flatten(1).amax(dim=1), local, distance)

    def terms_from_grid(
        self, grid: torch.Tensor, pooled_feats: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ScoreTerms]:
        """The anomaly map (B, H, W) and the raw image-score terms of a (B, Gh, Gw) error grid.

        ``pooled_feats`` (B, C): the raw features averaged over grid positions; needed only when
        the config has a global term.
        """
        return self.map_terms(self.upsample_grid(grid), self.global_distance(pooled_feats))

    def terms(self, feats: torch.Tensor) -> tuple[torch.Tensor, ScoreTerms]:
        """The anomaly map (B, S, S) and the raw image-score terms, before normalisation."""
        return self.terms_from_grid(self.error_grid(feats), feats.float().mean(dim=(2, 3)))

    def combine(self, terms: ScoreTerms) -> torch.Tensor:
        """The image score: the local term, normalised and fused with the global term."""
        if self.config.score_norm == "none":
            return terms.local
        score = normalise(terms.local, self.local_scale)
        if terms.global_distance is not None:
            score = score + self.config.global_weight * normalise(
                terms.global_distance, self.global_scale
            )
        return score

    def from_error_grid(
        self, grid: torch.Tensor, pooled_feats: torch.Tensor | None = None
    ) -> AnomalyOutput:
        """The map and score definition on a (B, G, G) error grid (shared with the fast path)."""
        amap, terms = self.terms_from_grid(grid, pooled_feats)
        return AnomalyOutput(amap, self.combine(terms), terms.max_score)

    def forward(self, feats: torch.Tensor) -> AnomalyOutput:
        amap, terms = self.terms(feats)
        return AnomalyOutput(amap, self.combine(terms), terms.max_score)


class DFRModel(nn.Module):
    """Extractor (frozen, shareable) + head (per product line)."""

    def __init__(
        self, extractor: FeatureExtractor, head: DFRHead, precision: PrecisionSpec | None = None
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head
        #: the precision eval forwards run at: its calibration's (dfr_core.precision)
        self.precision = precision or PrecisionSpec()

    @property
    def config(self) -> ModelConfig:
        return self.head.config

    def forward(self, x: torch.Tensor) -> AnomalyOutput:
        """x: (B, 3, S, S) ImageNet-normalised."""
        return self.head(self.extractor(x))

    @torch.no_grad()
    def predict(self, images: list[np.ndarray], batch_size: int = 16) -> AnomalyOutput:
        """Decoded images of any size -> maps at input_hw and scores, in eval mode, through
        the same batched forward (and precision) as calibration and the scoring job.

        A tiled model's maps have each image's own size: use `predict_images` (this stacks
        them and raises a ValueError saying so when the sizes differ)."""
        self.eval()
        if self.config.tile is not None:
            outs = self.predict_images(images, batch_size)
            shapes = {tuple(o.anomaly_map.shape) for o in outs}
            if len(shapes) > 1:
                raise ValueError(
                    f"tiled model: the images' maps have different sizes {sorted(shapes)}; "
                    "use predict_images"
                )
            return AnomalyOutput(
                torch.stack([o.anomaly_map for o in outs]),
                torch.tensor([o.score for o in outs]),
                torch.tensor([o.max_score for o in outs]),
            )
        outs = []
        size = self.config.image_size
        for i in range(0, len(images), batch_size):
            batch = np.stack([resize_image(img, size) for img in images[i : i + batch_size]])
            outs.append(forward_batch(self, batch))
        return concat_outputs(outs)

    @torch.no_grad()
    def predict_images(self, images: list[np.ndarray], batch_size: int = 16) -> list[ImageOutput]:
        """Decoded images of any size -> one ImageOutput each (a tiled model's map has the
        scaled image's size), through `dfr_core.geometry.prepare_image` + `forward_images`."""
        self.eval()
        return forward_images(self, [prepare_image(self.config, img) for img in images], batch_size)


def build_extractor(
    config: ModelConfig,
    weights_path: str | None = None,
    allow_random_init: bool = False,
) -> FeatureExtractor:
    """Build the frozen extractor a config describes (weights resolved by the backbone registry)."""
    backbone: FeatureBackbone = build_backbone(
        config.backbone,
        layers=config.layers or None,
        weights_path=weights_path,
        allow_random_init=allow_random_init,
    )
    return FeatureExtractor(backbone, config.image_size, config.pool)
