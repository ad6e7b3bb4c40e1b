"""Fitting the DFR autoencoder on cached features of normal images.

The backbone is frozen, so features are computed once and cached (fp16, within a memory
budget). The CAE is all 1x1 convolutions, so each step trains on randomly sampled grid positions
of a few images: the same objective as whole maps at a fraction of the cost on CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

from dfr_core.cae import pca_latent_dim
from dfr_core.config import ModelConfig, TrainConfig, to_dict
from dfr_core.device import inference_mode
from dfr_core.features import FeatureExtractor
from dfr_core.model import DFRHead, DFRModel
from dfr_core.preprocess import normalize_batch
from dfr_core.score_fit import (  # noqa: F401 - re-exported (they lived here)
    feature_batches,
    fit_global_term,
    fit_score_scales,
    pooled_bank,
    scales_from_terms,
    score_scales,
)
from dfr_core.train_inputs import TrainImages, count_images, model_inputs


class EpochStats(NamedTuple):
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float | None
    seconds: float


class FitResult(NamedTuple):
    model: DFRModel
    summary: dict


ProgressFn = Callable[[EpochStats], None]


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, held-out) split; at least one held out when fraction > 0."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


class HoldoutSplit(NamedTuple):
    """Indices into the normal images: disjoint, sorted, every index in exactly one part."""

    train: np.ndarray
    early_stopping: np.ndarray  # validation loss for early stopping; score-term scales
    calibration: np.ndarray  # thresholds only: never seen by training or model selection


def holdout_splits(n: int, val_fraction: float, calib_fraction: float, seed: int) -> HoldoutSplit:
    """Deterministic three-way split; each held-out part gets at least one image when its
    fraction is > 0 and at least two images stay for training (fit needs two)."""
    order = np.random.default_rng(seed).permutation(n)

    def size(fraction: float) -> int:
        return max(1, round(n * fraction)) if fraction > 0 else 0

    n_cal = min(size(calib_fraction), max(n - 2, 0))
    n_val = min(size(val_fraction), max(n - 2 - n_cal, 0))
    return HoldoutSplit(
        np.sort(order[n_cal + n_val :]),
        np.sort(order[n_cal : n_cal + n_val]),
        np.sort(order[:n_cal]),
    )


class EarlyStopping:
    """Tracks the best validation loss and a copy of the weights that gave it.

    `update` returns True when training should stop (patience epochs without an improvement
    of more than min_delta, relative); `restore` loads the best weights back.
    """

    def __init__(self, patience: int, min_delta: float) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch = math.inf, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, loss: float, module: torch.nn.Module) -> bool:
        if loss < self.best_loss * (1.0 - self.min_delta) or self.best_state is None:
            self.best_loss, self.best_epoch = loss, epoch
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        return bool(self.patience) and epoch - self.best_epoch >= self.patience

    def restore(self, module: torch.nn.Module) -> None:
        if self.best_state is not None:
            module.load_state_dict(self.best_state)


def extract_bank(
    extractor: FeatureExtractor,
    images: np.ndarray,
    config: TrainConfig,
    device: torch.device,
    generator: torch.Generator,
) -> torch.Tensor:
    """Features of (N, S, S, 3) uint8 images as an fp16 (N, C, P) bank on the CPU.

    P is every grid position when the bank fits config.cache_budget_mb, else a fixed random
    subset per image sized to fit (never less than positions_per_image).
    """
    gh, gw = extractor.grid_hw
    n, total = len(images), gh * gw
    per_image = extractor.channels * total * 2
    budget = config.cache_budget_mb * 2**20
    positions = total
    if n * per_image > budget:
        positions = max(config.positions_per_image, budget // (n * extractor.channels * 2))
        positions = min(positions, total)
    bank = torch.empty(n, extractor.channels, positions, dtype=torch.float16)
    for i in range(0, n, config.feature_batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + config.feature_batch_size]))
        with inference_mode(device):
            feats = extractor(normalize_batch(batch.to(device))).float().flatten(2).cpu()
        if positions < total:
            idx = torch.stack(
                [torch.randperm(total, generator=generator)[:positions] for _ in feats]
            )
            feats = torch.gather(feats, 2, idx[:, None, :].expand(-1, feats.shape[1], -1))
        bank[i : i + len(feats)] = feats.half()
    return bank


def subsample_positions(bank: torch.Tensor, positions: int, seed: int) -> torch.Tensor:
    """A fixed random subset of `positions` grid positions per image of an (N, C, P) bank.

    The validation loss is a mean over positions: 512 per image of ~80 images estimate it as
    well as all 4096 at an eighth of the per-epoch cost. Seeded on its own, so the training
    generator's sequence is the same with or without it. positions 0 (or >= P): the bank itself.
    """
    if positions <= 0 or positions >= bank.shape[2]:
        return bank
    gen = torch.Generator().manual_seed(seed + 7919)
    idx = torch.stack([torch.randperm(bank.shape[2], generator=gen)[:positions] for _ in bank])
    return torch.gather(bank, 2, idx[:, None, :].expand(-1, bank.shape[1], -1))


def channel_stats(bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all images and positions (float64 accumulation)."""
    total = torch.zeros(bank.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for chunk in bank.split(16):
        c = chunk.double()
        total += c.sum(dim=(0, 2))
        total_sq += c.pow(2).sum(dim=(0, 2))
    count = bank.shape[0] * bank.shape[2]
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp(min=0.0)
    return mean.float(), var.sqrt().float()


def sample_vectors(bank: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` random (image, position) feature vectors from the bank: (count, C) float32."""
    img = torch.randint(bank.shape[0], (count,), generator=generator)
    pos = torch.randint(bank.shape[2], (count,), generator=generator)
    return bank[img, :, pos].float()


def _batch(bank: torch.Tensor, idx: torch.Tensor, ppi: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, ppi, 1) float32: `ppi` random positions from each of the images `idx`."""
    chunk = bank[idx]
    if ppi < chunk.shape[2]:
        pos = torch.randint(chunk.shape[2], (len(idx), ppi), generator=gen)
        chunk = torch.gather(chunk, 2, pos[:, None, :].expand(-1, chunk.shape[1], -1))
    return chunk.float()[..., None]


@torch.no_grad()
def bank_loss(head: DFRHead, bank: torch.Tensor, device: torch.device) -> float:
    """Mean reconstruction error over every cached vector, in eval mode."""
    head.eval()
    total, count = 0.0, 0
    for chunk in bank.split(8):
        z = head.standardize(chunk.float()[..., None].to(device))
        total += float((head.cae(z) - z).pow(2).mean(dim=1).sum())
        count += chunk.shape[0] * chunk.shape[2]
    return total / max(count, 1)


def _train_epoch(head, bank, cfg, optimizer, gen, device) -> float:
    head.train()
    order = torch.randperm(bank.shape[0], generator=gen)
    losses = []
    for start in range(0, len(order), cfg.batch_size):
        z = head.standardize(
            _batch(bank, order[start : start + cfg.batch_size], cfg.positions_per_image, gen).to(
                device
            )
        )
        loss = (head.cae(z) - z).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    return float(np.mean(losses))


def build_head(
    channels: int,
    model_config: ModelConfig,
    bank: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
) -> tuple[DFRHead, int]:
    """Feature statistics and PCA latent width from the training bank -> an untrained head."""
    mean, std = channel_stats(bank)
    if model_config.latent_dim is not None:
        latent = model_config.latent_dim
    else:
        vectors = sample_vectors(bank, min(cfg.pca_samples, bank.shape[0] * bank.shape[2]), gen)
        if model_config.feature_norm == "channel":
            vectors = (vectors - mean) / std.clamp(min=1e-6)
        latent = min(pca_latent_dim(vectors, model_config.pca_variance), channels)
    torch.manual_seed(cfg.seed)
    head = DFRHead(model_config, channels, latent)
    head.set_feature_stats(mean, std)
    return head, latent


class HeadFit(NamedTuple):
    """A head trained on cached features (best weights restored if a validation bank was given)."""

    head: DFRHead
    latent_dim: int
    history: list[dict]
    best_epoch: int
    best_loss: float


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    """Per-epoch learning-rate schedule: None (constant) or cosine decay to 1 % of lr."""
    if cfg.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=cfg.epochs, eta_min=cfg.lr * 0.01
        )
    return None


def fit_head(
    model_config: ModelConfig,
    cfg: TrainConfig,
    bank: torch.Tensor,
    val_bank: torch.Tensor | None,
    device: torch.device,
    progress: ProgressFn | None = None,
) -> HeadFit:
    """Train a head on an fp16 (N, C, P) feature bank; early-stop on val_bank if given.

    Split from `fit` so a benchmark can train heads for several layer subsets of one cached
    superset bank (the channels of a layer subset are a slice of the superset's).
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    head, latent = build_head(bank.shape[1], model_config, bank, cfg, gen)
    head.to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    scheduler = _scheduler(optimizer, cfg)
    stopper = EarlyStopping(cfg.patience, cfg.min_delta)
    history: list[dict] = []
    last_train = math.inf
    for epoch in range(1, cfg.epochs + 1):
        t_epoch = time.perf_counter()
        last_train = _train_epoch(head, bank, cfg, optimizer, gen, device)
        if scheduler is not None:
            scheduler.step()
        val_loss = bank_loss(head, val_bank, device) if val_bank is not None else None
        stats = EpochStats(epoch, cfg.epochs, last_train, val_loss, time.perf_counter() - t_epoch)
        history.append(stats._asdict())
        if progress is not None:
            progress(stats)
        if val_loss is not None and stopper.update(epoch, val_loss, head):
            break
    if val_bank is not None:
        stopper.restore(head)
        best_epoch, best_loss = stopper.best_epoch, stopper.best_loss
    else:  # nothing held out: keep the last weights
        best_epoch, best_loss = len(history), last_train
    head.eval()
    return HeadFit(head, latent, history, best_epoch, best_loss)


def fit(
    extractor: FeatureExtractor,
    model_config: ModelConfig,
    train_config: TrainConfig,
    train_images: TrainImages,
    val_images: TrainImages | None = None,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Train a DFR head on normal images; early-stop on val_images if given.

    Images: (N, H, W, 3) uint8 at the model input (untiled), or `dfr_core.geometry.
    prepare_image` outputs (any geometry; a tiled model trains on their tiles, see
    dfr_core.train_inputs, and sets its score scales on whole stitched images).
    """
    device = device or torch.device("cpu")
    cfg = train_config
    if len(train_images) < 2:
        raise ValueError(f"need at least 2 training images, got {len(train_images)}")
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    extractor.to(device).eval()
    channels = extractor.channels
    train_inputs = model_inputs(train_images, model_config, cfg, channels, cfg.seed)
    bank = extract_bank(extractor, train_inputs, cfg, device, gen)
    val_bank = None
    if val_images is not None and len(val_images):
        val_inputs = model_inputs(val_images, model_config, cfg, channels, cfg.seed + 1)
        val_bank = extract_bank(extractor, val_inputs, cfg, device, gen)
        val_bank = subsample_positions(val_bank, cfg.val_positions, cfg.seed)
    t_features = time.perf_counter() - t0
    head, latent, history, best_epoch, best_loss = fit_head(
        model_config, cfg, bank, val_bank, device, progress
    )
    head.eval()
    norm_images = val_images if val_images is not None and len(val_images) else train_images
    score_terms = fit_global_term(head, bank, device)
    model = DFRModel(extractor, head)
    score_terms.update(score_scales(model, norm_images, cfg, device))
    score_terms["scales_from"] = "early_stopping" if norm_images is val_images else "training"
    head.eval()
    summary = {
        "train_images": int(len(train_images)),
        "val_images": count_images(val_images),
        "train_inputs": int(len(train_inputs)),
        "channels": extractor.channels,
        "latent_dim": latent,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "best_loss": best_loss,
        "score_terms": score_terms,
        "cached_positions_per_image": int(bank.shape[2]),
        "feature_seconds": round(t_features, 3),
        "train_seconds": round(time.perf_counter() - t0, 3),
        "train_config": to_dict(cfg),
        "history": history,
    }
    return FitResult(model, summary)
