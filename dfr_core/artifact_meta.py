"""The torch-free part of a model directory: its format, file names, checksums and model.json.

Why a module of its own: the scoring driver pins and checks every product line's model before
any Ray work, and must not import torch to do so (the CUDA build costs ~1 GB of RSS per
process). dfr_core.artifact re-exports everything here and adds what needs torch (the head).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dfr_core import __version__
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
