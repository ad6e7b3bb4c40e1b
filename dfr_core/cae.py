"""The DFR convolutional autoencoder (1x1 convolutions) and its PCA-chosen latent width."""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel_size=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CAE(nn.Module):
    """C -> (C+2d)/2 -> 2d -> d -> 2d -> (C+2d)/2 -> C, BN+ReLU on hidden layers only.

    Every layer is a 1x1 convolution, so each grid position is reconstructed from its own
    descriptor; training may therefore sample positions instead of whole maps.
    """

    def __init__(self, in_channels: int, latent_dim: int) -> None:
        super().__init__()
        if in_channels < 1 or latent_dim < 1:
            raise ValueError(f"bad CAE widths: in_channels={in_channels}, latent_dim={latent_dim}")
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        mid = (in_channels + 2 * latent_dim) // 2
        self.encoder = nn.Sequential(
            *_block(in_channels, mid),
            *_block(mid, 2 * latent_dim),
            nn.Conv2d(2 * latent_dim, latent_dim, kernel_size=1),
        )
        self.decoder = nn.Sequential(
            *_block(latent_dim, 2 * latent_dim),
            *_block(2 * latent_dim, mid),
            nn.Conv2d(mid, in_channels, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def pca_latent_dim(vectors: torch.Tensor, variance: float = 0.9) -> int:
    """Smallest number of principal components explaining `variance` of the (N, C) vectors."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    if vectors.ndim != 2 or vectors.shape[0] < 2:
        raise ValueError(
            f"need an (N >= 2, C) matrix of feature vectors, got {tuple(vectors.shape)}"
        )
    x = vectors.double()
    x = x - x.mean(dim=0, keepdim=True)
    cov = x.T @ x / (x.shape[0] - 1)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0.0)
    total = eig.sum()
    if total <= 0:
        return 1
    ratio = torch.cumsum(eig, 0) / total
    return int(torch.searchsorted(ratio, torch.tensor(variance, dtype=ratio.dtype)).item()) + 1
