"""The registry: every backbone the pipeline can use, by name (one module per backbone)."""

from __future__ import annotations

from collections.abc import Sequence

from dfr_core.backbones import efficientnet_lite, mobilenet_v2, vgg19
from dfr_core.backbones.spec import BackboneInfo, BackboneSpec, LayerInfo

_REGISTRY: dict[str, BackboneSpec] = {
    spec.info.name: spec for spec in (vgg19.SPEC, mobilenet_v2.SPEC, *efficientnet_lite.SPECS)
}


def list_backbones() -> list[str]:
    """Names accepted by build_backbone, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; ValueError naming the known ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r}; known backbones: {', '.join(_REGISTRY)}"
        ) from None


def backbone_info(name: str) -> BackboneInfo:
    """Static description of a registered backbone; ValueError for unknown names."""
    return get_spec(name).info


def select_layers(info: BackboneInfo, layers: Sequence[str] | None) -> tuple[LayerInfo, ...]:
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
