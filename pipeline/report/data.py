"""The numbers behind the QA report, as pure pandas functions of committed score rows.

Kept apart from the rendering (pipeline/report/page.py) so that counts, rates and the top-N choice
can be unit-tested against hand-built Parquet without images, plots or storage. Every function
takes the row frame the scoring job writes (SCORE_SCHEMA in pipeline/output_layout.py) and
returns a new frame; none mutates its input.

Definitions the report states and the tests pin down:

* ``rows`` is every committed row; ``ok`` the rows with ``status == "ok"``; ``errors`` the rest.
* ``anomaly_rate = anomalies / ok``. Error rows are excluded from the denominator because an
  unreadable image is neither normal nor anomalous; a line with only errors has no rate (NaN),
  not a rate of zero, so a broken camera never looks like a perfect day.
* The top-N gallery ranks ok rows by raw score, highest first, ties broken by ``image_id`` so
  two runs over the same rows always pick and order the same images.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.row_errors import RowStatus

OK = RowStatus.OK.value
UNKNOWN_REASON = "unknown"
_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_REASON_RE = re.compile(r"([a-z][a-z0-9_]*):")

#: Columns the report relies on; missing optional ones are added as nulls by :func:`normalise`.
REQUIRED_COLUMNS: tuple[str, ...] = ("image_id", "product_line", "run_date", "status")
OPTIONAL_COLUMNS: tuple[str, ...] = (
    "image_uri",
    "score",
    "threshold",
    "is_anomaly",
    "defect_area_fraction",
    "mask_uri",
    "heatmap_uri",
    "model_version",
    "run_id",
    "error_reason",
    "error",
)


def check_date(value: str, what: str = "date") -> str:
    """Validate YYYY-MM-DD (a real calendar date) and return it unchanged."""
    if not isinstance(value, str) or not _DATE_RE.fullmatch(value):
        raise ValueError(f"{what} must be YYYY-MM-DD, got {value!r}")
    dt.date.fromisoformat(value)
    return value


@dataclass(frozen=True)
class RowFilter:
    """Which committed rows a report covers: one run date or an inclusive range, some lines.

    Dates compare as strings, which is exact for zero-padded ISO dates. An empty ``products``
    means every line present in the data.
    """

    run_date: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    products: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "products", tuple(self.products))
        if self.run_date is not None and (self.date_from or self.date_to):
            raise ValueError("give either run_date or a date_from/date_to range, not both")
        for name in ("run_date", "date_from", "date_to"):
            value = getattr(self, name)
            if value is not None:
                check_date(value, name)
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise ValueError(f"date_from {self.date_from} is after date_to {self.date_to}")

    def describe(self) -> str:
        """Human-readable scope, for the report header."""
        if self.run_date:
            dates = self.run_date
        elif self.date_from or self.date_to:
            dates = f"{self.date_from or 'start'} to {self.date_to or 'latest'}"
        else:
            dates = "all dates"
        lines = ", ".join(self.products) if self.products else "all product lines"
        return f"{dates}; {lines}"


def _reason_of(reason: object, error: object) -> str:
    """The stable reason code of an error row: the ``error_reason`` column when the writer
    stored one, else the ``reason:`` prefix of the ``error`` text, else ``unknown``."""
    if isinstance(reason, str) and reason:
        return reason
    if isinstance(error, str):
        match = _REASON_RE.match(error.strip())
        if match:
            return match.group(1)
    return UNKNOWN_REASON


def normalise(rows: pd.DataFrame) -> pd.DataFrame:
    """A copy with every column the report uses, in plain dtypes.

    Readers may hand us nullable pandas dtypes (``boolean`` with NA on error rows) or files
    written before a column existed; downstream code then needs no null checks: ``is_anomaly``
    is a plain bool (False on error rows), ``score`` a float (NaN on error rows), ``reason`` a
    string on error rows and None on ok rows.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"score rows lack required columns {missing}")
    out = rows.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in out.columns:
            out[column] = None
    out["product_line"] = out["product_line"].astype(str)
    out["run_date"] = out["run_date"].astype(str)
    out["status"] = out["status"].astype(str)
    ok = out["status"] == OK
    out["score"] = pd.to_numeric(out["score"], errors="coerce").astype(float)
    out["threshold"] = pd.to_numeric(out["threshold"], errors="coerce").astype(float)
    anomalous = out["is_anomaly"].astype("boolean").fillna(False).astype(bool)
    out["is_anomaly"] = anomalous & ok
    reasons = [
        None if is_ok else _reason_of(r, e)
        for is_ok, r, e in zip(ok, out["error_reason"], out["error"], strict=True)
    ]
    out["reason"] = pd.Series(reasons, index=out.index, dtype=object)
    return out


def filter_rows(rows: pd.DataFrame, flt: RowFilter) -> pd.DataFrame:
    """The rows inside the filter's dates and lines (input already normalised; any frame with
    ``run_date`` and ``product_line`` columns, such as the drift rows, will do)."""
    keep = pd.Series(True, index=rows.index)
    if flt.run_date:
        keep &= rows["run_date"] == flt.run_date
    if flt.date_from:
        keep &= rows["run_date"] >= flt.date_from
    if flt.date_to:
        keep &= rows["run_date"] <= flt.date_to
    if flt.products:
        keep &= rows["product_line"].isin(flt.products)
    return rows.loc[keep].reset_index(drop=True)


def _rate(numerator: pd.Series, denominator: pd.Series) -> pd.Series:
    """Element-wise ratio that is NaN (no rate), not inf or 0, where the denominator is 0."""
    num = numerator.astype(float)
    den = denominator.astype(float)
    return num.where(den > 0, np.nan) / den.where(den > 0, np.nan)


def _counts(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """rows / ok / errors / anomalies per group of ``keys``, sorted by the keys."""
    if rows.empty:
        return pd.DataFrame(
            {
                **{k: pd.Series(dtype=object) for k in keys},
                **{c: pd.Series(dtype=int) for c in ("rows", "ok", "errors", "anomalies")},
            }
        )
    ok = rows["status"] == OK
    frame = rows[keys].assign(
        rows=1, ok=ok.astype(int), errors=(~ok).astype(int), anomalies=rows["is_anomaly"]
    )
    frame["anomalies"] = frame["anomalies"].astype(int)
    return frame.groupby(keys, sort=True, as_index=False)[
        ["rows", "ok", "errors", "anomalies"]
    ].sum()


def line_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per product line: counts, anomaly and error rates, dates and model versions.

    Columns: product_line, rows, ok, errors, anomalies, anomaly_rate, error_rate, first_date,
    last_date, dates (number of distinct run dates), model_versions (sorted tuple).
    """
    counts = _counts(rows, ["product_line"])
    counts["anomaly_rate"] = _rate(counts["anomalies"], counts["ok"])
    counts["error_rate"] = _rate(counts["errors"], counts["rows"])
    if rows.empty:
        for column in ("first_date", "last_date", "dates", "model_versions"):
            counts[column] = pd.Series(dtype=object)
        return counts
    grouped = rows.groupby("product_line", sort=True)
    extra = pd.DataFrame(
        {
            "first_date": grouped["run_date"].min(),
            "last_date": grouped["run_date"].max(),
            "dates": grouped["run_date"].nunique(),
            "model_versions": grouped["model_version"].agg(
                lambda s: tuple(sorted({v for v in s if isinstance(v, str) and v}))
            ),
        }
    ).reset_index()
    return counts.merge(extra, on="product_line", how="left")


def daily_rates(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (product_line, run_date): rows, ok, errors, anomalies, anomaly_rate.

    A date with zero anomalies has rate 0.0; a date with only error rows has rate NaN.
    """
    counts = _counts(rows, ["product_line", "run_date"])
    counts["anomaly_rate"] = _rate(counts["anomalies"], counts["ok"])
    return counts


def top_n(rows: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` highest-scoring ok rows of each product line, with a 1-based ``rank``.

    Ordered by product_line, then score descending, then image_id and run_date ascending (a
    deterministic tie-break). Rows with a NaN score are never chosen.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    candidates = rows[(rows["status"] == OK) & rows["score"].notna()]
    ordered = candidates.sort_values(
        ["product_line", "score", "image_id", "run_date"],
        ascending=[True, False, True, True],
        kind="mergesort",
    )
    chosen = ordered.groupby("product_line", sort=False).head(n).copy()
    chosen["rank"] = chosen.groupby("product_line", sort=False).cumcount() + 1
    return chosen.reset_index(drop=True)


def error_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that failed, with their reason code; sorted by line, date, reason and image id."""
    failed = rows[rows["status"] != OK]
    columns = ["product_line", "run_date", "image_id", "image_uri", "reason", "error"]
    return (
        failed[columns]
        .sort_values(["product_line", "run_date", "reason", "image_id"], kind="mergesort")
        .reset_index(drop=True)
    )


def reason_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Error counts per (product_line, reason), most frequent first within a line."""
    failed = rows[rows["status"] != OK]
    if failed.empty:
        return pd.DataFrame(
            {"product_line": pd.Series(dtype=object), "reason": pd.Series(dtype=object)}
        ).assign(count=pd.Series(dtype=int))
    counts = failed.groupby(["product_line", "reason"], as_index=False).size()
    counts = counts.rename(columns={"size": "count"})
    return counts.sort_values(
        ["product_line", "count", "reason"], ascending=[True, False, True], kind="mergesort"
    ).reset_index(drop=True)


def scores_of(rows: pd.DataFrame, product_line: str) -> np.ndarray:
    """Finite raw scores of a line's ok rows, for its histogram."""
    line = rows[(rows["product_line"] == product_line) & (rows["status"] == OK)]
    scores = line["score"].to_numpy(dtype=float)
    return scores[np.isfinite(scores)]


def thresholds_of(rows: pd.DataFrame, product_line: str) -> list[float]:
    """Distinct image thresholds used for a line's ok rows (one per model version, usually)."""
    line = rows[(rows["product_line"] == product_line) & (rows["status"] == OK)]
    values = line["threshold"].to_numpy(dtype=float)
    return sorted({float(v) for v in values if np.isfinite(v)})


def model_versions(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """Sorted distinct (product_line, model_version) pairs named by the rows."""
    pairs = {
        (line, version)
        for line, version in zip(rows["product_line"], rows["model_version"], strict=True)
        if isinstance(version, str) and version
    }
    return sorted(pairs)
