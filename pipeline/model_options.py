"""The options that define a product line's model, settable per manifest row and as train flags.

One table (OPTIONS) says, for each option, where it goes (ModelConfig, TrainConfig or
CalibrationConfig) and how a text cell becomes a value, so the manifest, the CLI and the saved
model.json agree. Precedence for every option: manifest cell > job flag > preset > dfr_core
default. Values are checked twice: each cell on its own when the manifest is parsed (so a typo
is reported with its line and column before anything runs), and the combination per row (layers
against the backbone, the score options together) when the job builds its tasks.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from dfr_core.backbones import backbone_info
from dfr_core.config import (
    FEATURE_NORMS,
    IMAGE_SCORES,
    PRESETS,
    SCORE_NORMS,
    CalibrationConfig,
    ModelConfig,
    TrainConfig,
    parse_size,
    preset_fields,
)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None


def parse_image_size(value: str) -> tuple[int | tuple[int, int] | None, str | None]:
    """An ``image_size`` cell or flag, ``N`` or ``HxW`` -> (size, None) or (None, the problem)."""
    try:
        size = parse_size(value) if "x" in value.lower() else _int(value)
        ModelConfig(image_size=size)
    except ValueError as exc:
        return None, str(exc)
    return size, None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None


def _choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _layers(text: str) -> tuple[str, ...]:
    """'features.1+features.3', 'features.1;features.3' or space-separated (CSV uses commas)."""
    names = tuple(n for n in re.split(r"[+;\s]+", text) if n)
    if not names:
        raise ValueError("no layer names")
    return names


def _preset(text: str) -> str:
    preset_fields(text)  # raises naming the known presets
    return text


class Option(NamedTuple):
    name: str  # manifest column and config field; the flag is --name-with-dashes
    target: type  # the config dataclass the value goes to (None for the preset)
    parse: Callable[[str], Any]
    help: str


OPTIONS: tuple[Option, ...] = (
    Option("preset", type(None), _preset, f"named configuration ({', '.join(PRESETS)})"),
    Option("layers", ModelConfig, _layers, "backbone layers, '+'-separated"),
    Option("feature_norm", ModelConfig, _choice(FEATURE_NORMS), "feature standardisation"),
    Option("smoothing_sigma", ModelConfig, _float, "Gaussian sigma of the map, pixels"),
    Option("image_score", ModelConfig, _choice(IMAGE_SCORES), "map -> image score"),
    Option("topk_fraction", ModelConfig, _float, "fraction of the map for topk_mean"),
    Option("score_norm", ModelConfig, _choice(SCORE_NORMS), "score normalisation"),
    Option("global_weight", ModelConfig, _float, "weight of the global term (0: off)"),
    # geometry (issue 12); the longer names first, so a message naming both blames the right one
    Option("tile_overlap", ModelConfig, _int, "overlap of neighbouring tiles, pixels"),
    Option("tile_scale", ModelConfig, _float, "resize factor of the image before tiling"),
    Option("max_tiles", ModelConfig, _int, "most tiles per image (more: an error row)"),
    Option("tile", ModelConfig, _int, "tile side in pixels (a multiple of 32); unset: no tiling"),
    Option("pixel_fpr", CalibrationConfig, _float, "target pixel FPR of the mask threshold"),
    Option("image_fpr", CalibrationConfig, _float, "target image FPR of the image threshold"),
)
OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS)
_BY_NAME = {o.name: o for o in OPTIONS}


def parse_cell(name: str, text: str) -> Any:
    """One manifest cell or flag value -> its typed value; ValueError with the reason."""
    option = _BY_NAME[name]
    value = option.parse(text)
    if option.target is not type(None):
        try:
            option.target(**{name: value})  # the config's own range checks
        except ValueError as exc:
            if str(exc).startswith(name):  # not a clash with another option's default
                raise ValueError(str(exc)) from None
    return value


class LineConfigs(NamedTuple):
    model: ModelConfig
    train: TrainConfig
    calibration: CalibrationConfig


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_configs(
    row: Mapping[str, Any],
    job: Mapping[str, Any],
    base_model: Mapping[str, Any],
    base_train: Mapping[str, Any],
    base_calibration: CalibrationConfig,
) -> LineConfigs:
    """Configs of one line: row option > job option > preset > base (job-wide) > default.

    `row`/`job` map option names to values (absent or None: not set). ValueError names the
    option at fault, as "option: message", so the caller can report the manifest column.
    """
    merged = {k: v for k, v in job.items() if v is not None}
    merged.update({k: v for k, v in row.items() if v is not None})
    preset = preset_fields(merged.pop("preset", "default"))
    model = {**preset, **dict(base_model)}
    model.update({k: v for k, v in merged.items() if k in _fields(ModelConfig)})
    calib = {k: v for k, v in merged.items() if k in _fields(CalibrationConfig)}
    backbone = model.get("backbone", ModelConfig().backbone)
    layers = model.get("layers") or ()
    known = {layer.name for layer in backbone_info(backbone).layers}
    unknown = [name for name in layers if name not in known]
    if unknown:
        raise ValueError(f"layers: unknown layer(s) {unknown} for backbone {backbone!r}")
    try:
        return LineConfigs(
            ModelConfig(**model),
            TrainConfig(**dict(base_train)),
            dataclasses.replace(base_calibration, **calib),
        )
    except ValueError as exc:
        named = [name for name in OPTION_NAMES if name in str(exc)]
        # report the column the row set, else a flag's, else the first option named
        culprit = next((n for n in named if n in row), next((n for n in named if n in job), None))
        raise ValueError(f"{culprit or (named or ['options'])[0]}: {exc}") from None
