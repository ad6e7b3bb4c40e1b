"""Multi-scale regional features (DFR section 3.1) at each layer's native resolution.

The reference code upsamples every layer to S x S (bilinear, align_corners=True) and then takes
4 x 4 mean pooling with stride 4. Both steps are linear and separable per axis, so the composition
is one small (S/4 x n) matrix per axis. Applying that matrix to the native n x n map gives the
reference's numbers (up to float rounding) without ever materialising the S x S activations,
which cost about 1 GB per 256 px image for VGG19's 3456 channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfr_core.backbones import FeatureBackbone


def upsample_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """Bilinear interpolation with align_corners=True as an (n_out, n_in) matrix."""
    if n_in == n_out:
        return torch.eye(n_in, dtype=torch.float64)
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    if n_in == 1:
        mat[:, 0] = 1.0
        return mat
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / max(n_out - 1, 1)
    lo = pos.floor().long().clamp(max=n_in - 2)
    frac = pos - lo
    rows = torch.arange(n_out)
    mat[rows, lo] = 1.0 - frac
    mat[rows, lo + 1] += frac
    return mat


def pool_matrix(n: int, k: int) -> torch.Tensor:
    """Mean pooling with kernel k and stride k as an (n // k, n) matrix."""
    mat = torch.zeros(n // k, n, dtype=torch.float64)
    for i in range(n // k):
        mat[i, i * k : (i + 1) * k] = 1.0 / k
    return mat


def regional_matrix(n_in: int, image_size: int, pool: int) -> torch.Tensor:
    """The composed upsample-then-pool operator for one axis: (image_size // pool, n_in)."""
    return pool_matrix(image_size, pool) @ upsample_matrix(n_in, image_size)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _is_channels_last(fmap: torch.Tensor) -> bool:
    return not fmap.is_contiguous() and fmap.is_contiguous(memory_format=torch.channels_last)


def _pool_channels_last(fmap: torch.Tensor, mh: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
    """``mh . f . mw^T`` per channel of a channels_last map, as two plain GEMMs on its (H, W*C)
    and (W, C) views: no transposing copy of the full-resolution map. Returns channels_last."""
    b, c, h, w = fmap.shape
    gh, gw = mh.shape[0], mw.shape[0]
    nhwc = fmap.permute(0, 2, 3, 1)  # a view: (B, H, W, C) contiguous
    rows = torch.matmul(mh, nhwc.reshape(b, h, w * c))  # (B, Gh, W*C)
    out = torch.matmul(mw, rows.view(b * gh, w, c))  # (B*Gh, Gw, C)
    return out.view(b, gh, gw, c).permute(0, 3, 1, 2)


def apply_regional(fmap: torch.Tensor, mh: torch.Tensor, mw: torch.Tensor) -> torch.Tensor:
    """``mh . f . mw^T`` per channel of (B, C, H, W), in the input's memory format."""
    if _is_channels_last(fmap):
        return _pool_channels_last(fmap, mh, mw)
    return torch.matmul(torch.matmul(mh, fmap), mw.transpose(0, 1))


#: Modules whose weights autocast casts to its lower precision (convolutions and linear maps).
_AUTOCAST_WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


class RegionalPooling(nn.Module):
    """Resize a list of feature maps to one (H/pool, W/pool) grid of regional descriptors and
    concat. ``image_size``: N (square) or (H, W); each axis gets its own regional matrix."""

    def __init__(self, image_size: int | tuple[int, int], pool: int = 4) -> None:
        super().__init__()
        hw = _hw(image_size)
        if hw[0] % pool or hw[1] % pool:
            raise ValueError(f"image_size {image_size} must be a multiple of pool {pool}")
        self.image_size = image_size
        self.input_hw = hw
        self.pool = pool
        self._cache: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}

    def _matrix(self, n_in: int, ref: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """The regional operator of one axis (0: rows, 1: columns) for a native size n_in."""
        size = self.input_hw[axis]
        key = (n_in, size, str(ref.device), ref.dtype)
        if key not in self._cache:
            mat = regional_matrix(n_in, size, self.pool)
            self._cache[key] = mat.to(device=ref.device, dtype=ref.dtype)
        return self._cache[key]

    def pool_one(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, Gh, Gw) in the input's memory format (NCHW or channels_last:
        the backbone's fast layout is pooled as it is, never copied to NCHW first)."""
        h, w = fmap.shape[-2:]
        if (h, w) == self.input_hw:
            return F.avg_pool2d(fmap, self.pool, self.pool)  # upsampling is the identity here
        return apply_regional(fmap, self._matrix(h, fmap, 0), self._matrix(w, fmap, 1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.pool_one(m.float()) for m in maps], dim=1)


class FeatureExtractor(nn.Module):
    """Frozen backbone + regional pooling: (B, 3, H, W) normalised -> (B, C, H/4, W/4)."""

    def __init__(
        self, backbone: FeatureBackbone, image_size: int | tuple[int, int], pool: int = 4
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = RegionalPooling(image_size, pool)
        self.image_size = image_size
        self.input_hw = _hw(image_size)
        self.channels = sum(layer.channels for layer in backbone.layers)
        #: the dtype the backbone's convolution/linear weights are stored at (`cast_backbone`)
        self.weights_dtype = torch.float32

    def cast_backbone(self, dtype: torch.dtype) -> FeatureExtractor:
        """Store the backbone's convolution and linear weights at ``dtype`` (bf16/fp16), once.

        Autocast at ``dtype`` casts exactly these weights to ``dtype`` on every call; storing
        them cast gives the same maps bit for bit (the same rounding, done once), without a
        per-call copy of every weight, and the fp32 weights are freed: the backbone holds half
        the memory. Such an extractor then runs under autocast at ``dtype`` only
        (`check_weights`). Other parameters (BatchNorm) stay fp32, as autocast leaves them.
        """
        if dtype == torch.float32:
            return self
        if self.weights_dtype not in (torch.float32, dtype):
            raise ValueError(f"backbone weights are already {self.weights_dtype}, not {dtype}")
        for module in self.backbone.modules():
            if isinstance(module, _AUTOCAST_WEIGHTED):
                module.to(dtype)
        self.weights_dtype = dtype
        return self

    def check_weights(self, compute_dtype: torch.dtype | None) -> None:
        """Refuse to run a backbone stored at bf16/fp16 at any other precision (its fp32
        weights are gone: `cast_backbone`). ``compute_dtype`` None means fp32."""
        compute_dtype = compute_dtype or torch.float32
        if self.weights_dtype not in (torch.float32, compute_dtype):
            raise ValueError(
                f"this extractor's backbone weights are stored at {self.weights_dtype} "
                f"(cast_backbone): it runs at that precision only, not at {compute_dtype}"
            )

    @property
    def grid_hw(self) -> tuple[int, int]:
        return (self.input_hw[0] // self.pooling.pool, self.input_hw[1] // self.pooling.pool)

    @property
    def grid_size(self) -> int:
        """The square grid side (square extractors only; see grid_hw)."""
        gh, gw = self.grid_hw
        if gh != gw:
            raise ValueError(f"grid {gh}x{gw} is not square: use grid_hw")
        return gh

    def check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.input_hw:
            h, w = self.input_hw
            raise ValueError(f"expected input of {h}x{w}, got {tuple(x.shape)}")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        autocast = torch.is_autocast_enabled(x.device.type)
        self.check_weights(torch.get_autocast_dtype(x.device.type) if autocast else None)
        gh, gw = self.grid_hw
        out = torch.empty(x.shape[0], self.channels, gh, gw, device=x.device)
        start = 0
        # Pool each map as soon as the backbone yields it, into a preallocated output: no
        # full-resolution map outlives its layer and no concatenation copy is made.
        for fmap in self.backbone.iter_maps(x):
            pooled = self.pooling.pool_one(fmap.float())
            out[:, start : start + pooled.shape[1]] = pooled
            start += pooled.shape[1]
        return out


def literal_regional_features(
    maps: list[torch.Tensor], image_size: int | tuple[int, int], pool: int = 4
) -> torch.Tensor:
    """The reference implementation's computation, kept for tests and the speed benchmark."""
    out = []
    for fmap in maps:
        up = F.interpolate(fmap, size=_hw(image_size), mode="bilinear", align_corners=True)
        out.append(F.avg_pool2d(up, pool, pool))
    return torch.cat(out, dim=1)
