"""The torch-free part of a model directory: its format, file names, checksums and model.json.

Why a module of its own: the scoring driver pins and checks every product line's model before
any Ray work, and must not import torch to do so (the CUDA build costs ~1 GB of RSS per
process). dfr_core.artifact re-exports everything here and adds what needs torch (the head).

model.json is parsed here, once, into a typed :class:`ModelMetadata`; this module and
dfr_core.artifact (which writes the file) are the only places that know its keys
(tests/unit/test_model_metadata.py checks that no other product module reads them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

from dfr_core import __version__
from dfr_core.config import (
    LEGACY_GEOMETRY_FIELDS,
    LEGACY_V1_MODEL_FIELDS,
    ModelConfig,
    from_dict,
)
from dfr_core.hashing import sha256_bytes  # noqa: F401 - re-exported (dfr_core.artifact)

_R = TypeVar("_R")

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


#: the keys every model.json has (format 1 and 2); the others are optional
REQUIRED_KEYS = ("model_config", "backbone", "latent_dim", "files")
#: what the scoring driver and its actors both say of a model without thresholds
NO_CALIBRATION = "the model has no calibration (no thresholds)"


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """model.json as written, after checking its format, version and required keys.

    Product code reads :func:`read_model_metadata` (typed); this raw form is what
    :func:`parse_metadata` starts from (and what tests compare with the file).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing model config")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from exc
    check_document(meta, str(path))
    return meta


def check_document(meta: object, source: str) -> None:
    """A model.json this library can read: our format, a known version, the required keys."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{source}: not a {FORMAT} config")
    version = meta.get("format_version")
    if isinstance(version, int) and version < 1:
        raise ArtifactError(
            f"{source}: unknown format_version {version} (this library reads 1..{FORMAT_VERSION})"
        )
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format_version {version!r} is newer than this library supports "
            f"({FORMAT_VERSION}); upgrade dfr-pipeline"
        )
    _check_required(meta, source)


def _check_required(meta: dict[str, Any], source: str) -> None:
    for key in REQUIRED_KEYS:
        if key not in meta:
            raise ArtifactError(f"{source}: missing key {key!r}")


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


# --------------------------------------------------------------------------------------------
# The typed model.json. Sections other than the required ones are optional and shown as
# recorded: a value of the wrong type reads as None (absent), never as an error, because only
# what loading needs (model_config, backbone, latent_dim, files) decides whether a model works.


def _section(meta: dict[str, Any], key: str) -> dict[str, Any]:
    value = meta.get(key)
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    """A recorded number (int or float, never bool), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _integer(value: object, what: str, source: str) -> int:
    """A required whole number (as int() reads it, like the loader always did)."""
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{source}: bad {what} {value!r}") from exc


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


#: how a recorded value of each plain field type is read (another type reads as None)
_READERS: dict[str, Callable[[object], Any]] = {
    "float | None": _number,
    "int | None": _count,
    "str | None": _text,
}


def _recorded(cls: type[_R], data: dict[str, Any], **rest: Any) -> _R:
    """A record of an optional section: each plain field read by its name and type from
    ``data``; ``rest`` gives the others (nested values, the whole recorded object)."""
    plain = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if isinstance(f.type, str) and f.type in _READERS:  # annotations are strings here
            plain[f.name] = _READERS[f.type](data.get(f.name))
    return cls(**plain, **rest)


@dataclass(frozen=True)
class BackboneRecord:
    """The frozen backbone a model was trained on (rebuilt from the registry on load)."""

    name: str
    layers: tuple[str, ...]
    channels: int | None  # None only in hand-written files: loading the head then fails
    weights_sha256: str | None  # None: a random-init backbone, which cannot be rebuilt
    weights_source: str | None

    @classmethod
    def parse(cls, data: object, source: str) -> BackboneRecord:
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            raise ArtifactError(f"{source}: bad backbone (an object with a name expected)")
        layers = data.get("layers") or []
        if not isinstance(layers, list):
            raise ArtifactError(f"{source}: bad backbone layers (a list expected)")
        channels = data.get("channels")
        return cls(
            name=data["name"],
            layers=tuple(str(layer) for layer in layers),
            channels=None if channels is None else _integer(channels, "backbone channels", source),
            weights_sha256=_text(data.get("weights_sha256")),
            weights_source=_text(data.get("weights_source")),
        )


@dataclass(frozen=True)
class CalibrationRecord:
    """The thresholds as recorded. ``fields`` is the whole recorded object, from which
    dfr_core.artifact.calibration_of builds (and validates) a Calibration; the attributes are
    for torch-free readers (the registry listing, the report)."""

    image_threshold: float | None
    pixel_threshold: float | None
    image_fpr: float | None
    pixel_fpr: float | None
    n_images: int | None
    method: str | None
    fields: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class TrainingSummary:
    """What training recorded: image counts, epochs, the loss history, the data splits."""

    train_images: int | None = None
    val_images: int | None = None
    epochs_run: int | None = None
    best_epoch: int | None = None
    best_loss: float | None = None
    history: tuple[Any, ...] = ()  # one {epoch, train_loss, val_loss, ...} per epoch
    #: which image URIs served early stopping / calibration (absent in older models)
    holdout: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class EvaluationRecord:
    """Metrics on the line's labelled set at training time (empty: the line had none)."""

    image_auroc: float | None = None
    pixel_auroc: float | None = None
    pro: float | None = None
    f1: float | None = None
    iou: float | None = None
    n_images: int | None = None
    n_anomalous: int | None = None
    #: {"roc": {"fpr", "tpr"}, "pixel_roc": {...}, "pro": {"fpr", "pro"}} when stored
    curves: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict, repr=False)  # everything recorded

    @property
    def evaluated(self) -> bool:
        return any(v is not None for v in (self.image_auroc, self.pixel_auroc, self.pro))


@dataclass(frozen=True)
class ModelMetadata:
    """model.json, typed: built once by :func:`parse_metadata`, read by attribute everywhere."""

    format_version: int
    model_config: ModelConfig  # with the meaning of the version that wrote it
    backbone: BackboneRecord
    latent_dim: int
    files: dict[str, str]  # file name -> sha256
    calibration: CalibrationRecord | None  # None: not calibrated (cannot score)
    training: TrainingSummary
    metrics: EvaluationRecord
    #: free-form provenance (save_model's ``extra``); the keys the pipeline writes and reads
    #: are the properties below
    extra: dict[str, Any]

    @property
    def weights_uri(self) -> str | None:
        """The backbone weights file the model was trained with (None: the offline package)."""
        return _text(self.extra.get("weights_uri")) or None

    @property
    def created_at(self) -> str | None:
        return _text(self.extra.get("created_at"))

    @property
    def train_image_count(self) -> int | None:
        return _count(self.extra.get("train_image_count"))

    @property
    def drift_reference(self) -> dict[str, Any] | None:
        """The stored drift reference (pipeline.drift), None for a model trained without one."""
        data = self.extra.get("drift_reference")
        return data if isinstance(data, dict) and data else None

    def require_calibration(self) -> CalibrationRecord:
        """The thresholds, or ArtifactError: without them a model cannot decide anything."""
        if self.calibration is None:
            raise ArtifactError(NO_CALIBRATION)
        return self.calibration


def _calibration(data: dict[str, Any]) -> CalibrationRecord:
    return _recorded(CalibrationRecord, data, fields=dict(data))


def _training(data: dict[str, Any]) -> TrainingSummary:
    history, holdout = data.get("history"), data.get("holdout")
    return _recorded(
        TrainingSummary, data,
        history=tuple(history) if isinstance(history, list) else (),
        holdout=holdout if isinstance(holdout, dict) else {},
    )  # fmt: skip


def _evaluation(data: dict[str, Any]) -> EvaluationRecord:
    curves = data.get("curves")
    curves = curves if isinstance(curves, dict) else {}
    return _recorded(EvaluationRecord, data, curves=curves, fields=dict(data))


def parse_metadata(meta: object, source: str) -> ModelMetadata:
    """The typed form of a model.json document (ArtifactError naming ``source`` and the key)."""
    check_document(meta, source)
    meta = cast(dict[str, Any], meta)  # check_document refused anything but an object
    files = meta["files"]
    if not isinstance(files, dict):
        raise ArtifactError(f"{source}: bad files (an object expected)")
    calibration = meta.get("calibration")
    if calibration and not isinstance(calibration, dict):
        raise ArtifactError(f"{source}: bad calibration in model.json: not an object")
    return ModelMetadata(
        format_version=meta["format_version"],
        model_config=model_config_of(meta),
        backbone=BackboneRecord.parse(meta["backbone"], source),
        latent_dim=_integer(meta["latent_dim"], "latent_dim", source),
        files={str(k): str(v) for k, v in files.items()},
        calibration=_calibration(calibration) if calibration else None,
        training=_training(_section(meta, "training")),
        metrics=_evaluation(_section(meta, "metrics")),
        extra=_section(meta, "extra"),
    )


def read_model_metadata(directory: str | os.PathLike) -> ModelMetadata:
    """model.json of a model directory, checked and typed."""
    return parse_metadata(read_metadata(directory), str(Path(directory) / CONFIG_FILE))
