"""The exact fast path from images to the per-position reconstruction-error grid (eval only).

`DFRHead.error_grid(FeatureExtractor(x))` is the reference: pool every layer onto the S/4 grid,
standardise, run the 1x1-conv autoencoder at every grid position, square the error. The same
numbers (up to float rounding) come out of less arithmetic and memory, because:

- the channel standardisation, the first 1x1 convolution and its BatchNorm (eval: an affine map)
  are one linear map, and the regional operator R (bilinear upsample + mean pool) is linear with
  rows summing to 1, so for a layer whose native map is coarser than the grid (VGG19 relu4_x is
  32 x 32 for a 64 x 64 grid) ``W1 . R(f)`` equals ``R(W1 . f)``: the widest matmul runs on 4x
  fewer positions. Layers of one native size share one R;
- every later BatchNorm folds into its convolution;
- positions are processed in chunks, so no full-width (C x S/4 x S/4) decoder output, difference
  or square is ever held for the whole image: activation memory is bounded by the chunk.

(Expanding ``||W x + b - z||^2`` into a Gram term ``x^T W^T W x`` was measured on paper: for the
paper's widths it costs more multiply-adds than the chunked direct form, 12.8 M against 12.1 M per
position, so the direct form is used; chunking gives the memory saving the expansion would.)

Computation can run at fp32 (the default, equal to the reference) or, when a model was calibrated
so, in bf16/fp16 (see dfr_core.precision).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from dfr_core.features import FeatureExtractor

#: Bytes of the widest fp32 tensor of one chunk (head width x positions): about a quarter of a
#: 32 MiB L3, so a chunk's product, difference and pooled bands stay in cache while its matmuls
#: are still large. VGG19-12 at 256 px (3456 channels) gets 8 grid rows of 64, 512 positions;
#: narrow heads (the default backbone, 232 channels) take the whole 64 x 64 grid at once.
#: Chosen by an ad-hoc in-process A/B on the 2-core AVX-512 dev machine (not a committed
#: benchmark): for VGG19-12, 512 positions were faster than 1,024 and 256, with half the
#: head's working memory of 1,024; for the default backbone, the whole grid was as fast as
#: 1,024 and 512 was slower. BENCHMARKS.md's figures are at this value.
CHUNK_BYTES = 7 << 20


def chunk_rows(width: int, grid_w: int) -> int:
    """Grid rows per chunk for a head whose widest layer has ``width`` channels."""
    return max(1, CHUNK_BYTES // (4 * width * grid_w))


class RegionalMaps(NamedTuple):
    """One backbone pass, shared by every head trained on that extractor.

    ``fine``: (B, C_fine, Gh, Gw) pooled features of the layers at or finer than the grid;
    ``coarse``: per native size (h, w), the (B, c_n, h, w) maps of the layers coarser than the grid
    (mapped onto the grid band by band, never whole: see `FoldedHead.error_grid`).
    Channel order: fine layers then coarse layers grouped by native size (see `_layout`).
    """

    fine: torch.Tensor
    coarse: tuple[torch.Tensor, ...]


class _Layout(NamedTuple):
    """Where each backbone layer's channels go in the fast path's channel order."""

    order: torch.Tensor  # permutation: fast-path channel k is the reference's channel order[k]
    n_fine: int
    coarse_sizes: tuple[tuple[int, int], ...]  # native (h, w) of the coarse groups, in order
    coarse_widths: tuple[int, ...]  # channels per coarse group


def layer_sizes(extractor: FeatureExtractor) -> list[tuple[int, int]]:
    """Native (h, w) of each layer's map for an input of input_hw (ceil for odd strides)."""
    height, width = extractor.input_hw
    strides = [layer.stride for layer in extractor.backbone.layers]
    return [(-(-height // s), -(-width // s)) for s in strides]


def is_fine(hw: tuple[int, int], grid_hw: tuple[int, int]) -> bool:
    """A map at least as fine as the grid on both axes is pooled at once; any other stays at
    native resolution (the coarse path is exact for any linear regional operator)."""
    return hw[0] >= grid_hw[0] and hw[1] >= grid_hw[1]


def _layout(extractor: FeatureExtractor) -> _Layout:
    grid = extractor.grid_hw
    fine: list[int] = []
    groups: dict[tuple[int, int], list[int]] = {}
    start = 0
    for layer, n in zip(extractor.backbone.layers, layer_sizes(extractor), strict=True):
        idx = list(range(start, start + layer.channels))
        start += layer.channels
        if is_fine(n, grid):
            fine += idx
        else:
            groups.setdefault(n, []).extend(idx)
    sizes = tuple(sorted(groups, reverse=True))
    order = fine + [i for n in sizes for i in groups[n]]
    return _Layout(torch.tensor(order), len(fine), sizes, tuple(len(groups[n]) for n in sizes))


def pooled_means(extractor: FeatureExtractor, maps: RegionalMaps) -> torch.Tensor:
    """(B, C) position-means of the regional features, in the reference channel order.

    Equals ``extractor(x).mean(dim=(2, 3))`` (the global score term's input) without building
    the coarse layers' full (B, c, Gh, Gw) maps: the grid mean of ``Mh f Mw^T`` is
    ``ah^T f aw`` with ``ah``, ``aw`` the column means of the two axes' regional operators.
    """
    parts = [maps.fine.mean(dim=(2, 3))]
    pooling = extractor.pooling
    for fmap in maps.coarse:
        ah = pooling._matrix(fmap.shape[-2], fmap, 0).mean(dim=0)
        aw = pooling._matrix(fmap.shape[-1], fmap, 1).mean(dim=0)
        parts.append(torch.einsum("bchw,h,w->bc", fmap, ah, aw))
    means = torch.cat(parts, dim=1)
    out = torch.empty_like(means)
    out[:, _layout(extractor).order.to(means.device)] = means
    return out


def extract_regional(
    extractor: FeatureExtractor, x: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> RegionalMaps:
    """Run the backbone once; pool fine layers, keep coarse layers at native resolution too.

    ``autocast_dtype`` (bf16/fp16) runs the backbone convolutions under autocast; pooling is
    always fp32 (it is cheap and keeps the descriptors as exact as the maps allow). The
    returned maps are fp32 NCHW.
    """
    grid = extractor.grid_hw
    extractor.check_input(x)
    n_fine = _layout(extractor).n_fine
    fine = torch.empty(x.shape[0], n_fine, *grid, device=x.device, dtype=torch.float32)
    start = 0
    coarse: dict[tuple[int, int], list[torch.Tensor]] = {}
    maps = extractor.backbone.iter_maps(x)
    # The generator's convolutions run under autocast (it resumes inside the outer context).
    # Each fine map is pooled at fp32 in its own memory format (channels_last from the
    # backbone: no full-resolution NCHW copy) straight into its channels of the output (no
    # list of pooled maps to concatenate: that copy doubled the peak); coarse maps are kept
    # as they come.
    with torch.no_grad(), _autocast(x.device, autocast_dtype):
        for fmap in maps:
            hw = (fmap.shape[-2], fmap.shape[-1])
            if is_fine(hw, grid):
                with _autocast(x.device, None):
                    pooled = extractor.pooling.pool_one(fmap.float())
                fine[:, start : start + pooled.shape[1]].copy_(pooled)
                start += pooled.shape[1]
            else:
                coarse.setdefault(hw, []).append(fmap)
    sizes = sorted(coarse, reverse=True)
    natives = tuple(_stack_channels(coarse[n], x, n) for n in sizes)
    return RegionalMaps(fine, natives)


def _stack_channels(
    parts: list[torch.Tensor], x: torch.Tensor, hw: tuple[int, int]
) -> torch.Tensor:
    """Concatenate maps along channels into one contiguous fp32 NCHW tensor (the head reads
    channel rows): one copy per part that converts dtype and memory format together."""
    channels = sum(part.shape[1] for part in parts)
    out = torch.empty(x.shape[0], channels, *hw, device=x.device, dtype=torch.float32)
    start = 0
    for part in parts:
        out[:, start : start + part.shape[1]].copy_(part)
        start += part.shape[1]
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):  # noqa: ANN202
    if dtype is None or dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class _Linear(NamedTuple):
    weight: torch.Tensor  # (out, in)
    bias: torch.Tensor  # (out, 1)
    relu: bool


def _fold_cae(cae: nn.Module) -> list[_Linear]:
    """The CAE as a list of affine maps (each 1x1 conv with its eval BatchNorm folded in)."""
    layers: list[list] = []
    for module in list(cae.encoder) + list(cae.decoder):
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().double().flatten(1)
            b = (
                module.bias.detach().double()
                if module.bias is not None
                else torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
            )
            layers.append([w, b, False])
        elif isinstance(module, nn.BatchNorm2d):
            scale = module.weight.detach().double() / torch.sqrt(
                module.running_var.double() + module.eps
            )
            w, b, _ = layers[-1]
            shift = module.bias.detach().double() - module.running_mean.double() * scale
            layers[-1][0], layers[-1][1] = w * scale[:, None], b * scale + shift
        elif isinstance(module, nn.ReLU):
            layers[-1][2] = True
        else:
            raise TypeError(f"fast path cannot fold CAE module {type(module).__name__}")
    return [_Linear(w, b[:, None], relu) for w, b, relu in layers]


def _add_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a + b`` for an fp32 ``b``: in place when ``a`` is fp32 already; for a bf16/fp16
    ``a`` one promoting add (a.float() + b, bit for bit) rather than a copy and then an add:
    one pass less over the head's widest tensors."""
    return a.add_(b) if a.dtype == torch.float32 else torch.add(a, b)


class FoldedHead:
    """A DFRHead's eval-mode computation rearranged for the fast path (weights folded once).

    Built for one extractor layout, device and compute dtype; `error_grid` takes the
    extractor's `RegionalMaps` and returns the (B, Gh, Gw) fp32 error grid.
    """

    def __init__(
        self, head: nn.Module, extractor: FeatureExtractor, dtype: torch.dtype = torch.float32
    ) -> None:
        layout = _layout(extractor)
        self.layout, self.dtype, self.grid_hw = layout, dtype, extractor.grid_hw
        self.pooling = extractor.pooling
        channels = int(layout.order.numel())
        if head.cae.in_channels != channels:
            raise ValueError(f"head expects {head.cae.in_channels} channels, extractor {channels}")
        device = head.feature_mean.device
        order = layout.order.to(device)
        if head.config.feature_norm == "channel":
            mean = head.feature_mean.detach().double().flatten()[order]
            inv_std = 1.0 / head.feature_std.detach().double().flatten()[order]
        else:
            mean = torch.zeros(channels, dtype=torch.float64, device=device)
            inv_std = torch.ones_like(mean)
        layers = _fold_cae(head.cae)
        first, last = layers[0], layers[-1]
        # standardisation folded into the first layer: W1 ((f - m) * s) = (W1 s) f - W1 (m s)
        w1 = first.weight[:, order] * inv_std[None, :]
        b1 = first.bias - w1 @ mean[:, None]
        nf = layout.n_fine
        cast = dict(device=device, dtype=dtype)
        self.w1_fine = w1[:, :nf].to(**cast).contiguous()
        self.w1_coarse = [
            part.to(**cast).contiguous() for part in w1[:, nf:].split(layout.coarse_widths, dim=1)
        ]
        self.b1 = b1.float()
        self.first_relu = first.relu
        self.middle = [
            _Linear(x.weight.to(**cast).contiguous(), x.bias.to(**cast), x.relu)
            for x in layers[1:-1]
        ]
        self.w_last = last.weight[order].to(**cast).contiguous()
        # reconstruction - z = W h + b - (f - m) s = W h + (b + m s) - f s
        self.b_last = (last.bias.flatten() + mean * inv_std)[:, None].float()
        self.inv_std = inv_std[:, None].float()
        self.channels = channels
        self.width = max([channels] + [int(layer.weight.shape[0]) for layer in layers])

    def _band(self, native: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Grid rows r0:r1 of the regional operator applied to (c, h, w): (c, (r1-r0)*Gw)."""
        mh = self.pooling._matrix(native.shape[-2], native, 0)
        mw = self.pooling._matrix(native.shape[-1], native, 1)
        return torch.matmul(torch.matmul(mh[r0:r1], native), mw.T).flatten(1)

    def _chunk(
        self,
        fine: torch.Tensor,
        coarse: list[torch.Tensor],
        first_coarse: list[torch.Tensor],
        r0: int,
        r1: int,
    ) -> torch.Tensor:
        """Error of grid rows r0:r1 of one image -> ((r1-r0)*G,) fp32.

        ``fine``: (C_fine, Gh*Gw) pooled; ``coarse``: per native size, (c_n, h, w) maps;
        ``first_coarse``: per native size, the first layer's (H1, h, w) contribution at native
        resolution. Only this band's rows are mapped onto the grid.
        """
        g, nf = self.grid_hw[1], self.layout.n_fine
        fine = fine[:, r0 * g : r1 * g]
        h = (self.w1_fine @ fine.to(self.dtype)) if nf else None
        for part in first_coarse:
            band = self._band(part, r0, r1)
            h = band if h is None else _add_fp32(h, band)
        h = _add_fp32(h, self.b1)
        if self.first_relu:
            h = h.relu_()
        h = h.to(self.dtype)
        for layer in self.middle:
            h = torch.addmm(layer.bias, layer.weight, h)
            if layer.relu:
                h = h.relu_()
        diff = _add_fp32(self.w_last @ h, self.b_last)
        # minus the standardised target, fine rows then each coarse group (no concatenation)
        diff[:nf].addcmul_(fine, self.inv_std[:nf], value=-1.0)
        start = nf
        for native in coarse:
            stop = start + native.shape[0]
            diff[start:stop].addcmul_(
                self._band(native, r0, r1), self.inv_std[start:stop], value=-1.0
            )
            start = stop
        return diff.pow_(2).sum(dim=0).div_(self.channels)

    @torch.no_grad()
    def error_grid(self, maps: RegionalMaps) -> torch.Tensor:
        b, (gh, g) = maps.fine.shape[0], self.grid_hw
        sizes = tuple((m.shape[-2], m.shape[-1]) for m in maps.coarse)
        if sizes != self.layout.coarse_sizes or maps.fine.shape[1] != self.layout.n_fine:
            raise ValueError(f"maps do not match the head's layout: coarse sizes {sizes}")
        rows = chunk_rows(self.width, g)
        out = torch.empty(b, gh, g, device=maps.fine.device)
        for i in range(b):
            fine = maps.fine[i].flatten(1)
            coarse = [m[i] for m in maps.coarse]
            # the widest matmul, on the coarse layers' native positions (exact: R is linear)
            first = [
                (w @ m.flatten(1).to(self.dtype)).float().view(-1, *m.shape[-2:])
                for w, m in zip(self.w1_coarse, coarse, strict=True)
            ]
            for r0 in range(0, gh, rows):
                r1 = min(r0 + rows, gh)
                out[i, r0:r1] = self._chunk(fine, coarse, first, r0, r1).view(r1 - r0, g)
        return out


def _state_key(head: nn.Module, dtype: torch.dtype) -> tuple:
    tensors = list(head.parameters()) + list(head.buffers())
    return (dtype, tuple((t.data_ptr(), t._version, str(t.device)) for t in tensors))


def folded_head(
    head: nn.Module, extractor: FeatureExtractor, dtype: torch.dtype = torch.float32
) -> FoldedHead:
    """The head's FoldedHead, cached on the head and rebuilt whenever its weights change."""
    key = (id(extractor), _state_key(head, dtype))
    cache = head.__dict__.setdefault("_folded_cache", {})
    if key not in cache:
        cache.clear()
        cache[key] = FoldedHead(head, extractor, dtype)
    return cache[key]


def reference_error_grid(
    extractor: FeatureExtractor, head: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """Today's computation (pool everything, standardise, CAE, squared error): the oracle."""
    with torch.no_grad():
        return head.error_grid(extractor(x))


def fast_error_grid(extractor: FeatureExtractor, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fp32 fast path for one head (tests and benchmarks; scoring uses dfr_core.inference)."""
    return folded_head(head, extractor).error_grid(extract_regional(extractor, x))


__all__ = [
    "CHUNK_BYTES",
    "FoldedHead",
    "RegionalMaps",
    "chunk_rows",
    "extract_regional",
    "fast_error_grid",
    "folded_head",
    "reference_error_grid",
]
