"""The frozen feature extractor DFR runs (the "pretrained CNN" of the paper's section 3.1), and
building one from the registry."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Self

from torch import Tensor, nn

from dfr_core.backbones.registry import get_spec, select_layers
from dfr_core.backbones.spec import BackboneSpec, LayerInfo
from dfr_core.backbones.stripes import MapRows, block_end, run_block
from dfr_core.backbones.weights import (
    RANDOM_INIT,
    WeightsNotFoundError,
    apply_weights,
    offline_weights,
    sha256_file,
)
from dfr_core.winograd import use_winograd

logger = logging.getLogger("dfr_core.backbones")


def _check_rgb(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) input, got shape {tuple(x.shape)}")


def default_weights_path(name: str) -> pathlib.Path | None:
    """The offline weights file build_backbone uses without an explicit one, or None."""
    return offline_weights(get_spec(name))


class FeatureBackbone(nn.Module):
    """Frozen feature extractor (requires_grad False, always in eval mode).

    Takes ImageNet-normalised RGB (B, 3, H, W) and returns one map per requested layer, in
    forward order. Computation stops at the deepest requested layer: with shallow layers only,
    the deep (expensive, unused) part of the network is never run.
    """

    name: str
    layers: tuple[LayerInfo, ...]
    weights_sha256: str | None
    weights_source: str

    def __init__(
        self,
        spec: BackboneSpec,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        weights_source: str,
        weights_sha256: str | None,
    ) -> None:
        super().__init__()
        self.name = spec.info.name
        self.info = spec.info
        self.layers = layers
        self.weights_source = weights_source
        self.weights_sha256 = weights_sha256
        self.input_norm = spec.make_input_norm()
        self.model = model
        # module-level function, not a bound closure, so the backbone stays picklable
        self._iter_steps = spec.iter_steps
        self._steps = tuple(spec.step_of[layer.name] for layer in layers)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Self:
        """Ignore `mode`: BatchNorm statistics and dropout must stay frozen (DFR's backbone is
        fixed), and a pipeline calling .train() on a parent module must not silently change
        the features."""
        return super().train(False)

    def iter_maps(self, x: Tensor) -> Iterator[Tensor]:
        """Yield the requested maps one at a time, in self.layers order, as they are computed.

        A consumer that reduces each map right away (regional pooling) never holds all the
        full-resolution maps at once, which keeps peak memory near a single layer's.
        """
        _check_rgb(x)
        want = set(self._steps)
        last = self._steps[-1]
        x = self.input_norm(x)
        for i, step in enumerate(self._iter_steps(self.model)):
            x = step(x)
            if i in want:
                yield x
            if i == last:
                break

    def iter_map_rows(self, x: Tensor, rows: int) -> Iterator[MapRows]:
        """`iter_maps` with every stripable block (`dfr_core.backbones.stripes`: row-local
        steps ending in a 2 x 2 max pool, such as each of VGG's first blocks) run ``rows``
        rows of its full-resolution maps at a time: its requested maps come as `MapRows`
        stripes, each row once, in order; every other map whole (``row0`` 0). Its peak memory
        is a stripe's, not a whole early map's."""
        _check_rgb(x)
        want = {step: k for k, step in enumerate(self._steps)}
        last = self._steps[-1]
        steps = list(islice(self._iter_steps(self.model), last + 1))
        x = self.input_norm(x)
        i = 0
        while i <= last:
            end = block_end(steps, i)
            if end is not None and end - 1 <= last and x.shape[-2] % 2 == 0 and rows % 2 == 0:
                local = {j - i: want[j] for j in range(i, end) if j in want}
                x = yield from run_block(steps[i:end], x, rows, local)
                if end - 1 in want:
                    yield MapRows(want[end - 1], 0, x)
                i = end
                continue
            x = steps[i](x)
            if i in want:
                yield MapRows(want[i], 0, x)
            i += 1

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.iter_maps(x))

    def use_winograd(self) -> int:
        """Run the wide 3x3 convolutions as Winograd F(2x2, 3x3) (`dfr_core.winograd`: fp32
        CPU inference only), in the steps up to the deepest requested layer: those past it
        never run and keep their plain weights. Returns how many were replaced."""
        steps = zip(range(self._steps[-1] + 1), self._iter_steps(self.model), strict=False)
        return use_winograd(self.model, [s for _, s in steps if isinstance(s, nn.Module)])

    def extra_repr(self) -> str:
        names = ", ".join(layer.name for layer in self.layers)
        return f"name={self.name}, layers=[{names}], weights={self.weights_source}"


def build_backbone(
    name: str,
    layers: Sequence[str] | None = None,
    weights_path: str | os.PathLike[str] | None = None,
    allow_random_init: bool = False,
) -> FeatureBackbone:
    """Build a frozen backbone for `layers` (None: the backbone's defaults).

    Weights: `weights_path` (must exist) > default_weights_path(name) > random init when
    `allow_random_init` (with a warning) > WeightsNotFoundError.
    """
    spec = get_spec(name)
    selected = select_layers(spec.info, layers)
    if weights_path is not None:
        path: pathlib.Path | None = pathlib.Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    else:
        path = offline_weights(spec)
    if path is None and not allow_random_init:
        raise WeightsNotFoundError(
            f"no weights found for backbone {name!r}: {spec.info.weights_help}. "
            "(Random init is only used when explicitly allowed, e.g. for smoke tests.)"
        )

    model = spec.make_model()
    if path is None:
        logger.warning(
            "backbone %r uses RANDOM INIT weights (allow_random_init=True): features are not "
            "ImageNet features and anomaly maps will be meaningless",
            name,
        )
        source, digest = RANDOM_INIT, None
    else:
        apply_weights(spec, model, path)
        source, digest = str(path), sha256_file(path)
    spec.strip_head(model)
    return FeatureBackbone(spec, model, selected, source, digest)
