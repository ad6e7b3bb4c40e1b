"""The promotion gate: a newly trained version becomes LATEST only if it is not worse.

On the line's evaluation set (its manifest test set plus the confirmed defects of QA feedback)
the candidate and the current LATEST are both evaluated; the candidate is promoted unless, on
any metric that exists for both, it is worse than LATEST by more than ``tolerance`` (absolute).
The gated metrics are the threshold-free ones (image AUROC, pixel AUROC, PRO, TPR at 1 % image
FPR); realised FPR and recall at the calibrated thresholds are shown but not gated, since they
move with the (small) calibration set rather than with the model's quality.

Every decision (automatic or ``models promote``) is a JSON record under
``{models}/{line}/_promotions/``, written before LATEST changes, so ``models list`` can always
say why LATEST holds. The first version of a line, and a line with no evaluation set, is
promoted as before.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from dfr_core.artifact import ArtifactError, load_model, read_model_metadata
from dfr_core.config import ModelConfig
from pipeline import evaluation, registry, storage
from pipeline.storage import StorageOptions

GATED_METRICS: tuple[str, ...] = ("image_auroc", "pixel_auroc", "pro", "tpr_at_1pct_fpr")
SHOWN_METRICS: tuple[str, ...] = GATED_METRICS + ("realised_image_fpr", "realised_image_recall")
DEFAULT_TOLERANCE = 0.02
PROMOTIONS = "_promotions"


class Basis(StrEnum):
    """Why a decision was taken."""

    FIRST_VERSION = "first_version"
    NO_EVALUATION_SET = "no_evaluation_set"
    CURRENT_UNUSABLE = "current_unusable"  # LATEST cannot be loaded or evaluated
    GATE = "gate"
    MANUAL = "manual"


@dataclass(frozen=True)
class GateResult:
    """The decision on one version, as stored and printed."""

    promote: bool
    basis: Basis
    reason: str
    current_version: str | None = None
    tolerance: float = DEFAULT_TOLERANCE
    comparison: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["basis"] = str(self.basis)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateResult:
        return cls(
            promote=bool(data["promote"]),
            basis=Basis(data["basis"]),
            reason=str(data["reason"]),
            current_version=data.get("current_version"),
            tolerance=float(data.get("tolerance", DEFAULT_TOLERANCE)),
            comparison=data.get("comparison") or {},
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value == value else None


def compare(
    candidate: dict[str, Any],
    current: dict[str, Any],
    current_version: str,
    tolerance: float = DEFAULT_TOLERANCE,
) -> GateResult:
    """Gate a candidate's metrics against the current LATEST's, on the same evaluation set."""
    comparison: dict[str, dict[str, float | None]] = {}
    worse, compared = [], []
    for name in SHOWN_METRICS:
        new, old = _number(candidate.get(name)), _number(current.get(name))
        delta = None if new is None or old is None else new - old
        comparison[name] = {"candidate": new, "current": old, "delta": delta}
        if name in GATED_METRICS and delta is not None:
            compared.append(name)
            if delta < -tolerance:
                worse.append(f"{name} {new:.4f} < {old:.4f} - {tolerance:g}")
    if not compared:
        return GateResult(True, Basis.NO_EVALUATION_SET, "no metric exists for both versions",
                          current_version, tolerance, comparison)  # fmt: skip
    if worse:
        reason = f"held: worse than LATEST {current_version}: " + "; ".join(worse)
        return GateResult(False, Basis.GATE, reason, current_version, tolerance, comparison)
    reason = (f"promoted: not worse than LATEST {current_version} beyond {tolerance:g} on "
              f"{', '.join(compared)}")  # fmt: skip
    return GateResult(True, Basis.GATE, reason, current_version, tolerance, comparison)


def format_comparison(result: GateResult) -> str:
    """A small text table of the comparison (the train command prints it for held versions)."""
    lines = [result.reason]
    for name, values in result.comparison.items():
        if values["candidate"] is None and values["current"] is None:
            continue
        cells = [f"{values[k]:.4f}" if values[k] is not None else "-"
                 for k in ("candidate", "current", "delta")]  # fmt: skip
        lines.append(f"    {name:22s} new {cells[0]:>8s}  latest {cells[1]:>8s}  diff {cells[2]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Records


def _promotions_uri(models_uri: str, line: str) -> str:
    return storage.join_uri(models_uri, storage.safe_component(line, "product line"), PROMOTIONS)


def write_decision(
    models_uri: str,
    line: str,
    version: str,
    result: GateResult,
    options: StorageOptions | None = None,
    by: str | None = None,
) -> str:
    """Store one decision record (before LATEST changes); returns its URI."""
    now = dt.datetime.now(dt.UTC)
    record = {
        "product_line": line,
        "version": version,
        "decided_at": now.isoformat(timespec="microseconds"),  # orders decisions of a second
        "by": by,
        **result.to_dict(),
    }
    name = f"{now:%Y%m%dT%H%M%S.%f}Z-{secrets.token_hex(3)}-{version}.json"
    uri = storage.join_uri(_promotions_uri(models_uri, line), name)
    storage.write_text_atomic(uri, json.dumps(record, indent=2, sort_keys=True), options)
    return uri


def history(models_uri: str, line: str, options: StorageOptions | None = None) -> list[dict]:
    """Every decision record of a line, oldest first."""
    try:
        uris = storage.list_files(_promotions_uri(models_uri, line), (".json",), options)
    except FileNotFoundError:
        return []
    records = [json.loads(storage.read_text(u, options)) for u in uris
               if not posixpath.basename(u).startswith(".")]  # fmt: skip
    return sorted(records, key=lambda r: (r["decided_at"], r["version"]))


def decisions_by_version(
    models_uri: str, line: str, options: StorageOptions | None = None
) -> dict[str, dict[str, Any]]:
    """The latest decision record per version."""
    return {r["version"]: r for r in history(models_uri, line, options)}


def promote(
    models_uri: str,
    line: str,
    version: str,
    reason: str | None = None,
    options: StorageOptions | None = None,
) -> GateResult:
    """``models promote``: make ``version`` LATEST by hand, recorded as a manual decision."""
    if version not in registry.list_versions(models_uri, line, options):
        raise ValueError(f"product line {line!r} has no complete version {version!r}")
    current = registry.latest_version(models_uri, line, options)
    text = f"promoted by hand over {current}" + (f": {reason}" if reason else "")
    result = GateResult(True, Basis.MANUAL, text, current)
    write_decision(models_uri, line, version, result, options, by="models promote")
    registry.set_latest(models_uri, line, version, options)
    return result


# --------------------------------------------------------------------------------------------
# The gate inside a training task


def gate_candidate(
    models_uri: str,
    line: str,
    candidate_metrics: dict[str, Any],
    samples: list[Any],
    tolerance: float,
    cache_dir: str,
    options: StorageOptions | None,
    device: Any,
    extractor_factory: Callable[[ModelConfig, str | None], Any],
) -> GateResult:
    """Decide on a candidate: evaluate the current LATEST on the same samples and compare.

    ``samples`` are the evaluation samples the candidate was measured on (pipeline.evaluation);
    ``extractor_factory(model_config, weights_path)`` gives the backbone (the task's cache).
    """
    current = registry.latest_version(models_uri, line, options)
    if current is None:
        return GateResult(True, Basis.FIRST_VERSION, "promoted: first version of the line")
    if not samples or not candidate_metrics:
        text = "promoted: the line has no evaluation set (no test_uri, no confirmed defects)"
        return GateResult(True, Basis.NO_EVALUATION_SET, text, current, tolerance)
    try:
        directory = registry.fetch(models_uri, line, current, cache_dir, options)
        meta = read_model_metadata(directory)
        config = meta.model_config
        weights = registry.resolve_weights(meta.weights_uri, cache_dir, options)
        loaded = load_model(directory, weights, extractor_factory(config, weights))
        lset = evaluation.load_eval_set(samples, config, options)
        metrics = evaluation.evaluate_model(
            loaded.model, loaded.calibration, lset, device, curves=False
        )
    except (ArtifactError, OSError, ValueError, KeyError) as exc:
        text = storage.redact(f"promoted: current LATEST {current} cannot be evaluated ({exc})")
        return GateResult(True, Basis.CURRENT_UNUSABLE, text, current, tolerance)
    return compare(candidate_metrics, metrics, current, tolerance)
