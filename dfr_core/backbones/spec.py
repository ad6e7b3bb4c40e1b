"""What a registered backbone declares: its layers (channels, stride) and how to build, load and
run it. Declared statically, so callers size the reconstruction network and the regional grid
without building anything; tests/unit/test_backbones.py checks every declaration against a
real forward pass."""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn


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


Step = Callable[[Tensor], Tensor]


def _identity_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return sd


def _keep_head(model: nn.Module) -> None:
    return None


@dataclass(frozen=True)
class BackboneSpec:
    """How to build, load and run one registered backbone."""

    info: BackboneInfo
    step_of: Mapping[str, int]  # layer name -> index of the step whose output it is
    make_model: Callable[[], nn.Module]  # full architecture whose state dict matches the file
    iter_steps: Callable[[nn.Module], Iterator[Step]]  # forward split into steps, in order
    weights_file: str  # the canonical file name (torch hub cache / offline package)
    package_file: Callable[[], pathlib.Path | None]  # offline weights package file, if any
    adapt_state_dict: Callable[[dict[str, Tensor]], dict[str, Tensor]] = _identity_state_dict
    strip_head: Callable[[nn.Module], None] = _keep_head
    make_input_norm: Callable[[], nn.Module] = nn.Identity


def indexed(prefix: str, blocks: Sequence[tuple[int, int]]) -> tuple[LayerInfo, ...]:
    """``prefix.0``, ``prefix.1``, ... from (channels, stride) per block."""
    return tuple(LayerInfo(f"{prefix}.{i}", ch, s) for i, (ch, s) in enumerate(blocks))


def no_package() -> pathlib.Path | None:
    """For backbones without an offline weights package."""
    return None


def iter_sequential_features(model: nn.Module) -> Iterator[Step]:
    """The steps of a model whose ``features`` is an nn.Sequential (VGG, MobileNet)."""
    yield from model.features
