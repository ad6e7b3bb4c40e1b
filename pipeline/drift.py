"""Drift statistics of one night's rows of one product line against its model's reference.

Pure functions of (rows, reference, config): no Ray, no storage, so the statistics are
unit-tested directly. pipeline.drift_io stores the reference at training time, computes these
for every scoring run and writes the ``drift`` table.

Three signals, each a significance test with an effect-size floor where a p-value alone would
flag trivial shifts on large nights:

* **anomaly rate** - the night's flagged fraction of ok rows against what the calibration
  promises. A threshold set on n reference images with k of them above it is exceeded by a new
  normal image with probability p whose distribution over calibration sets is Beta(k+1, n-k)
  (mean (k+1)/(n+1), the ``expected_rate``, well above a 1 % target on a small calibration set).
  So under "the night is like the calibration images" the number of flags among m ok rows is
  beta-binomial(m, k+1, n-k), and the p-value is its upper tail (``scipy.stats.betabinom``): on
  a 20-image calibration set a normal night whose calibration happened to be unlucky does not
  page anyone, while on a large calibration set the test tends to the binomial test against
  (k+1)/(n+1). Without reference scores it is the binomial test against the target FPR.
* **score shift** - two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``) of the ok
  rows' image scores against the reference scores of the calibration images.
* **input shift** - the same KS test for each input statistic (pipeline.input_stats) against
  the training images' values: catches a new light or a defocused lens.

A line is ``drifted`` when it has at least ``min_images`` ok rows and any test has
p < ``level`` (with KS statistic >= ``min_ks`` for the KS tests).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from scipy import stats

from pipeline.input_stats import STAT_NAMES
from pipeline.row_errors import RowStatus

#: Reasons a line is drifted (the ``reasons`` column, comma-separated).
#: The score column the shift test reads: the image score the flag is decided on (the
#: reference holds the same score of the calibration images).
SCORE_COLUMN = "anomaly_score"
ANOMALY_RATE = "anomaly_rate"
SCORE_SHIFT = "score_shift"


@dataclass(frozen=True)
class DriftConfig:
    """When a night counts as drifted (the scoring job's ``drift_*`` settings)."""

    level: float = 0.001  # per-test significance level
    min_images: int = 20  # fewer ok rows: statistics reported, never drifted
    min_ks: float = 0.2  # KS statistic a shift must also reach (effect size)

    def __post_init__(self) -> None:
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"drift level must be in (0, 1), got {self.level}")
        if self.min_images < 1:
            raise ValueError(f"drift min_images must be >= 1, got {self.min_images}")
        if not 0.0 <= self.min_ks <= 1.0:
            raise ValueError(f"drift min_ks must be in [0, 1], got {self.min_ks}")


@dataclass(frozen=True)
class DriftReference:
    """What a model was calibrated on, stored in model.json under ``extra.drift_reference``."""

    image_scores: tuple[float, ...]  # image scores of the calibration (held-out) images
    image_threshold: float
    image_fpr: float  # calibration target
    input_stats: dict[str, tuple[float, ...]]  # name -> values on the training images

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_scores": list(self.image_scores),
            "image_threshold": self.image_threshold,
            "image_fpr": self.image_fpr,
            "input_stats": {k: list(v) for k, v in self.input_stats.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DriftReference:
        return cls(
            image_scores=tuple(float(v) for v in data["image_scores"]),
            image_threshold=float(data["image_threshold"]),
            image_fpr=float(data["image_fpr"]),
            input_stats={k: tuple(float(x) for x in v) for k, v in data["input_stats"].items()},
        )

    @property
    def expected_rate(self) -> float:
        """The flag rate the calibration promises on normal images (see module doc)."""
        scores = np.asarray(self.image_scores, dtype=np.float64)
        if not scores.size:
            return self.image_fpr
        above = int(np.count_nonzero(scores > self.image_threshold))
        return max(self.image_fpr, (above + 1) / (scores.size + 1))

    def anomaly_p(self, flagged: int, total: int) -> float:
        """P(at least ``flagged`` of ``total`` normal images exceed the threshold): the
        beta-binomial upper tail (module doc)."""
        scores = np.asarray(self.image_scores, dtype=np.float64)
        if not scores.size:
            return float(stats.binomtest(flagged, total, self.image_fpr, "greater").pvalue)
        above = int(np.count_nonzero(scores > self.image_threshold))
        tail = stats.betabinom.sf(flagged - 1, total, above + 1, scores.size - above)
        return float(min(1.0, max(0.0, tail)))


@dataclass(frozen=True)
class LineDrift:
    """One row of the ``drift`` table (docs/operating.md documents every column)."""

    product_line: str
    run_date: str
    run_id: str
    model_version: str | None
    n_ok: int
    n_anomalous: int
    anomaly_rate: float | None
    expected_rate: float | None
    anomaly_p: float | None
    score_ks: float | None
    score_p: float | None
    brightness_ks: float | None
    brightness_p: float | None
    contrast_ks: float | None
    contrast_p: float | None
    sharpness_ks: float | None
    sharpness_p: float | None
    level: float
    drifted: bool
    reasons: str  # comma-separated: anomaly_rate, score_shift, brightness, contrast, sharpness
    note: str | None = None  # why a statistic is missing (no reference, too few images)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LineDrift:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        """The one line ``nightly`` prints for a drifting product line."""
        parts = []
        if ANOMALY_RATE in self.reasons:
            parts.append(
                f"anomaly rate {self.anomaly_rate:.1%} ({self.n_anomalous}/{self.n_ok}) vs "
                f"expected <= {self.expected_rate:.1%}, p={self.anomaly_p:.2g}"
            )
        if SCORE_SHIFT in self.reasons:
            parts.append(f"score shift KS={self.score_ks:.2f} p={self.score_p:.2g}")
        for name in STAT_NAMES:
            if name in self.reasons.split(","):
                ks, p = getattr(self, f"{name}_ks"), getattr(self, f"{name}_p")
                parts.append(f"{name} shift KS={ks:.2f} p={p:.2g}")
        return f"DRIFT {self.product_line} ({self.run_date}): " + "; ".join(parts)


def _finite(values: Any) -> np.ndarray:
    array = np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def _ks(night: np.ndarray, reference: tuple[float, ...]) -> tuple[float | None, float | None]:
    ref = np.asarray(reference, dtype=np.float64)
    if night.size == 0 or ref.size < 2:
        return None, None
    with warnings.catch_warnings():
        # scipy tries the exact p-value up to 10,000 values per sample and, where its
        # recursion does not converge, warns and gives the asymptotic one: a valid p-value, and a
        # RuntimeWarning in a nightly log that nobody can act on.
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful")
        result = stats.ks_2samp(night, ref)
    return float(result.statistic), float(result.pvalue)


def _column(rows: dict[str, list[Any]], name: str, ok: np.ndarray) -> np.ndarray:
    values = rows.get(name)
    if values is None:
        return np.empty(0)
    return _finite([v for v, keep in zip(values, ok, strict=True) if keep])


def compute_drift(
    rows: dict[str, list[Any]],
    reference: DriftReference | None,
    config: DriftConfig,
    product_line: str,
    run_date: str,
    run_id: str,
    model_version: str | None,
    totals: tuple[int, int] | None = None,
) -> LineDrift:
    """Drift of one line's rows (columns as lists: ``status``, ``score``, ``is_anomaly`` and
    the input statistics; any other columns are ignored) against ``reference``.

    ``totals`` (ok rows, anomalous rows) of the whole night, when ``rows`` is a sample of it:
    the anomaly rate is then exact and the distribution tests use the sample.
    """
    ok = np.asarray([s == RowStatus.OK for s in rows["status"]], dtype=bool)
    n_ok = int(ok.sum())
    flags = [bool(a) for a, keep in zip(rows["is_anomaly"], ok, strict=True) if keep]
    n_anom = int(sum(flags))
    if totals is not None:
        n_ok, n_anom = totals
    values: dict[str, Any] = {
        "anomaly_rate": n_anom / n_ok if n_ok else None,
        "expected_rate": None,
        "anomaly_p": None,
        "score_ks": None,
        "score_p": None,
    }
    for name in STAT_NAMES:
        values[f"{name}_ks"] = values[f"{name}_p"] = None
    notes = []
    if reference is None:
        notes.append("the model has no drift reference (trained before drift watch)")
    elif n_ok:
        values["expected_rate"] = reference.expected_rate
        values["anomaly_p"] = reference.anomaly_p(n_anom, n_ok)
        values["score_ks"], values["score_p"] = _ks(
            _column(rows, SCORE_COLUMN, ok), reference.image_scores
        )
        for name in STAT_NAMES:
            ks, p = _ks(_column(rows, name, ok), reference.input_stats.get(name, ()))
            values[f"{name}_ks"], values[f"{name}_p"] = ks, p
    reasons = _reasons(values, config)
    enough = n_ok >= config.min_images
    if not enough:
        notes.append(f"{n_ok} ok images, fewer than the {config.min_images} needed to judge")
    return LineDrift(
        product_line=product_line,
        run_date=run_date,
        run_id=run_id,
        model_version=model_version,
        n_ok=n_ok,
        n_anomalous=n_anom,
        level=config.level,
        drifted=bool(enough and reasons),
        reasons=",".join(reasons) if enough else "",
        note="; ".join(notes) or None,
        **values,
    )


def _significant(p: float | None, level: float) -> bool:
    return p is not None and not math.isnan(p) and p < level


def _reasons(values: dict[str, Any], config: DriftConfig) -> list[str]:
    reasons = []
    if _significant(values["anomaly_p"], config.level):
        reasons.append(ANOMALY_RATE)
    for key, name in [("score", SCORE_SHIFT)] + [(n, n) for n in STAT_NAMES]:
        ks = values[f"{key}_ks"]
        if _significant(values[f"{key}_p"], config.level) and ks >= config.min_ks:
            reasons.append(name)
    return reasons
