"""The CAE's architecture and the PCA latent width."""

import pytest
import torch

from dfr_core.cae import CAE, pca_latent_dim


def test_cae_widths_follow_the_paper():
    cae = CAE(100, 10)
    convs = [m for m in cae.modules() if isinstance(m, torch.nn.Conv2d)]
    widths = [(c.in_channels, c.out_channels) for c in convs]
    assert widths == [(100, 60), (60, 20), (20, 10), (10, 20), (20, 60), (60, 100)]
    assert all(c.kernel_size == (1, 1) for c in convs)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in cae.modules()) == 4
    # no activation on the latent or the output
    assert isinstance(cae.encoder[-1], torch.nn.Conv2d) and isinstance(
        cae.decoder[-1], torch.nn.Conv2d
    )
    out = cae.eval()(torch.randn(2, 100, 3, 3))
    assert out.shape == (2, 100, 3, 3) and torch.isfinite(out).all()


def test_pca_latent_dim_on_known_spectrum():
    torch.manual_seed(0)
    # variances 10, 10, 0.1 x 8 -> two components explain 20/20.8 = 96% > 90%
    scale = torch.tensor([10.0, 10.0] + [0.1] * 8).sqrt()
    x = torch.randn(20000, 10) * scale
    q, _ = torch.linalg.qr(torch.randn(10, 10))
    assert pca_latent_dim(x @ q, 0.9) == 2
    assert pca_latent_dim(x @ q, 0.97) > 2
    assert pca_latent_dim(x, 1.0) == 10


def test_pca_latent_dim_rejects_bad_input():
    with pytest.raises(ValueError):
        pca_latent_dim(torch.randn(5, 3), 0.0)
    with pytest.raises(ValueError):
        pca_latent_dim(torch.randn(1, 3), 0.9)
