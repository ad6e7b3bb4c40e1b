"""Where a backbone's weights come from, and checking them: never fetched over the network,
never silently replaced by a random init (random features still "work": they train and score,
but the anomaly maps mean nothing). Order: an explicit file, then an offline weights package or
the torch hub cache, then random init only when explicitly allowed. Every loaded file's sha256
is recorded (model.json names the exact weights a model was built on).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dfr_core.backbones.spec import BackboneSpec
from dfr_core.hashing import sha256_file  # noqa: F401 - re-exported (dfr_core.backbones)

RANDOM_INIT = "random-init"


class WeightsNotFoundError(RuntimeError):
    """No weights were found; the message says how to provide them."""


def offline_weights(spec: BackboneSpec) -> pathlib.Path | None:
    """The offline weights file that would be used without --weights, or None.

    Checks the backbone's offline weights package first, then the torch hub cache
    (torch.hub.get_dir()/checkpoints/<file>), which torchvision fills on a download elsewhere.
    """
    pkg = spec.package_file()
    if pkg is not None and pkg.is_file():
        return pkg
    cached = pathlib.Path(torch.hub.get_dir()) / "checkpoints" / spec.weights_file
    return cached if cached.is_file() else None


def load_state_dict(path: pathlib.Path) -> dict[str, Tensor]:
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


def apply_weights(spec: BackboneSpec, model: nn.Module, path: pathlib.Path) -> None:
    sd = spec.adapt_state_dict(load_state_dict(path))
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
