"""The torch-free part of a model directory: its format, file names, checksums and model.json.

Why a module of its own: the scoring driver pins and checks every product line's model before
any Ray work, and must not import torch to do so (the CUDA build costs ~1 GB of RSS per
process). dfr_core.artifact re-exports everything here and adds what needs torch (the head).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from dfr_core import __version__
from dfr_core.config import LEGACY_GEOMETRY_FIELDS, LEGACY_V1_MODEL_FIELDS, ModelConfig, from_dict
from dfr_core.hashing import sha256_bytes  # noqa: F401 - re-exported (dfr_core.artifact)

FORMAT = "dfr-pipeline-model"
#: 2: image score per ModelConfig.image_score / score_norm / global_weight (score-term buffers
#: in head.pt, Calibration.max_threshold). 1: image score = max of the map; still loaded, with
#: the fields it lacks set to what version 1 meant (config.LEGACY_V1_MODEL_FIELDS).
FORMAT_VERSION = 2
CONFIG_FILE = "model.json"
HEAD_FILE = "head.pt"
LIBRARY_VERSION = __version__  # recorded in model.json; one copy (pyproject.toml's aside)


class ArtifactError(ValueError):
    """A model directory that cannot be trusted: bad checksum, missing file, unknown format."""


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate model.json (format, version, required keys)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing model config")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} config")
    version = meta.get("format_version")
    if isinstance(version, int) and version < 1:
        raise ArtifactError(
            f"{path}: unknown format_version {version} (this library reads 1..{FORMAT_VERSION})"
        )
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {version!r} is newer than this library supports "
            f"({FORMAT_VERSION}); upgrade dfr-pipeline"
        )
    for key in ("model_config", "backbone", "latent_dim", "files"):
        if key not in meta:
            raise ArtifactError(f"{path}: missing key {key!r}")
    return meta


def model_config_of(meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig a model.json describes, with the meaning of the version that wrote it.

    A format-1 file lacks the image-score fields; they get the values version 1 used (max of
    the map), never today's defaults. From version 2 on every field must be present, except the
    geometry fields of issue 12 (tile, tile_overlap, ...), whose absence means what every model
    before them was: one square image_size, no tiling (LEGACY_GEOMETRY_FIELDS).
    """
    stored = meta["model_config"]
    version = meta.get("format_version")
    if not isinstance(stored, dict):
        raise ArtifactError("bad model_config in model.json: not an object")
    if not stored.get("layers") and isinstance(meta.get("backbone"), dict):
        # "layers: []" meant "the backbone's default layers" when it was written; the layers it
        # really used are recorded beside it, so a later change of a default cannot change them
        stored = {**stored, "layers": list(meta["backbone"].get("layers") or [])}
    # geometry fields (issue 12) absent: written before they existed, square and untiled
    stored = {**LEGACY_GEOMETRY_FIELDS, **stored}
    if version == 1:
        stored = {**LEGACY_V1_MODEL_FIELDS, **stored}
    else:
        missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(stored))
        if missing:
            raise ArtifactError(
                f"model.json (format_version {version}) lacks model_config fields {missing}; "
                "refusing to fill them with defaults that could change what its scores mean"
            )
    try:
        return from_dict(ModelConfig, stored)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"bad model_config in model.json: {exc}") from exc
