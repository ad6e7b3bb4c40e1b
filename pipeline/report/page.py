"""The page: the report's numbers, pictures and plots poured into one Jinja2 template.

Design notes (the "why"):

* One self-contained file. Thumbnails and plots are inlined as ``data:`` URIs, so the report
  can be mailed, attached to a ticket or opened from disk without its folder.
* Every string from data is HTML-escaped by the template, never by hand: the environment
  autoescapes, and its ``finalize`` escapes every value with ``html.escape(quote=True)`` (the
  escaping this page has always used: ``&quot;``, ``&#x27;``), so nothing from a score row, a
  model.json or a feedback table reaches the page raw. Only our own CSS and script and the
  template's markup are not escaped.
* No network, enforced: a Content-Security-Policy ``<meta>`` allows only ``data:`` images and
  the one inline stylesheet and script (by hash), so even a data-borne string that escaped
  escaping could not load or run anything.
* The inline script only counts loaded images into ``<body data-images-*>`` on window load; the
  browser test reads those attributes from the dumped DOM.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from markupsafe import Markup

from pipeline import storage
from pipeline.drift_io import read_drift
from pipeline.feedback import load_feedback
from pipeline.input_stats import STAT_NAMES
from pipeline.report import data as rd
from pipeline.report.formatting import MISSING, is_number, num, pct, stat
from pipeline.report.images import Panel, gallery_panels
from pipeline.report.inputs import ReportConfig, load_rows, scores_root
from pipeline.report.models import ModelView, model_view, read_model_info
from pipeline.report.plots import histogram_plot, rate_plot

REPORT_FILE = "report.html"
DRIFT_HEADERS = ("run date", "images", "anomaly rate", "expected", "p (rate)", "score KS",
                 *(f"{n} KS" for n in STAT_NAMES), "drifted", "reasons")  # fmt: skip
_TEMPLATES = resources.files("pipeline.report") / "templates"
CSS = (_TEMPLATES / "report.css").read_text(encoding="utf-8")
SCRIPT = (_TEMPLATES / "report.js").read_text(encoding="utf-8")


def _escape(value: object) -> Markup:
    """Every value the template prints: escaped (quotes too, safe inside attributes)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
    autoescape=True,
    finalize=_escape,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["num"] = num


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def csp() -> str:
    """Only data: images, and only our own inline style and script (pinned by hash)."""
    return (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(CSS)}; script-src {_csp_hash(SCRIPT)}; "
        "base-uri 'none'; form-action 'none'"
    )


@dataclass(frozen=True)
class Cell:
    field: str
    text: str
    numeric: bool = True


def _count_cells(r: Any) -> list[Cell]:
    return [
        Cell("rows", num(r.rows)),
        Cell("ok", num(r.ok)),
        Cell("anomalies", num(r.anomalies)),
        Cell("anomaly_rate", pct(r.anomaly_rate)),
        Cell("errors", num(r.errors)),
    ]


def overview_rows(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """The per-line count table at the top (cells carry data-field for the browser test)."""
    rows = []
    for r in summary.itertuples(index=False):
        versions = ", ".join(r.model_versions) if r.model_versions else MISSING
        dates = f"{r.first_date} to {r.last_date} ({num(r.dates)})"
        cells = _count_cells(r) + [
            Cell("dates", dates, False),
            Cell("model_versions", versions, False),
        ]
        rows.append({"line": r.product_line, "cells": cells})
    return rows


def _gallery_item(row: pd.Series, panels: tuple[Panel, ...]) -> dict[str, Any]:
    area = row.get("defect_area_fraction")
    return {
        "rank": int(row["rank"]),
        "score": num(row["score"]),
        "score_repr": repr(float(row["score"])),
        "threshold": num(row["threshold"]),
        "anomalous": bool(row["is_anomaly"]),
        "area": pct(area, 2) if is_number(area) else None,
        "run_date": row["run_date"],
        "image_id": str(row["image_id"]),
        "image_uri": row["image_uri"],
        "panels": panels,
    }


def line_view(index: int, line: str, rows: pd.DataFrame, config: ReportConfig) -> dict[str, Any]:
    """One product line: counts by date, histogram, rate over time, gallery, errors."""
    own = rows[rows["product_line"] == line]
    daily = rd.daily_rates(own)
    top = rd.top_n(own, config.top_n)
    errors = rd.error_rows(own)
    return {
        "index": index,
        "line": line,
        "daily": [
            {"date": r.run_date, "cells": _count_cells(r)} for r in daily.itertuples(index=False)
        ],
        "histogram": histogram_plot(
            rd.scores_of(own, line), rd.thresholds_of(own, line), f"{line}: score distribution"
        ),
        "rates": rate_plot(daily, f"{line}: anomaly rate by run date"),
        "gallery": [_gallery_item(row, gallery_panels(row, config)) for _, row in top.iterrows()],
        "reasons": list(rd.reason_counts(own).itertuples(index=False)),
        "errors": list(errors.head(config.max_error_rows).itertuples(index=False)),
        "more_errors": max(0, len(errors) - config.max_error_rows),
    }


def model_views(rows: pd.DataFrame, config: ReportConfig) -> list[ModelView]:
    if not config.models_uri:
        return []
    return [
        model_view(read_model_info(config.models_uri, line, version, config.storage))
        for line, version in rd.model_versions(rows)
    ]


def drift_view(drift: pd.DataFrame) -> list[dict[str, Any]]:
    """Per product line: its drift statistics per run date, drifted dates marked."""
    lines = []
    for line, group in drift.groupby("product_line", sort=True):
        dates = []
        for r in group.sort_values("run_date").to_dict("records"):
            values = [r["n_ok"], r["anomaly_rate"], r["expected_rate"], r["anomaly_p"],
                      r["score_ks"], *(r[f"{n}_ks"] for n in STAT_NAMES)]  # fmt: skip
            dates.append(
                {
                    "date": r["run_date"],
                    "drifted": bool(r["drifted"]),
                    "stats": [stat(v) for v in values],
                    "why": r["reasons"] or r["note"] or "",
                }
            )
        lines.append({"line": line, "dates": dates})
    return lines


def feedback_view(uri: str, rows: pd.DataFrame, config: ReportConfig) -> dict[str, Any]:
    """The reviewed images, their verdicts, and their latest score in scope (if scored)."""
    feedback = load_feedback(uri, None, config.storage)
    latest: dict[str, dict[str, Any]] = {}
    if not rows.empty and "image_uri" in rows:
        for r in rows.sort_values("run_date").to_dict("records"):
            latest[r["image_uri"]] = r
    verdicts = []
    for f in feedback.rows:
        scored = latest.get(f.image_uri) or {}
        flagged = scored.get("is_anomaly")
        verdicts.append(
            {
                "row": f,
                "score": stat(scored.get("score")),
                "flagged": "-" if flagged is None else ("yes" if flagged else "no"),
            }
        )
    return {"uri": feedback.uri, "sha256": feedback.sha256[:12], "verdicts": verdicts}


def render_html(config: ReportConfig, rows: pd.DataFrame, generated_at: str) -> str:
    """The whole page for normalised, filtered ``rows``."""
    root = scores_root(config.scores_uri, config.storage)
    summary = rd.line_summary(rows)
    lines = [] if rows.empty else list(summary["product_line"])
    drift = rd.filter_rows(read_drift(root, config.storage), config.row_filter)
    runs = sorted({r for r in rows["run_id"] if isinstance(r, str)})
    context = {
        "config": config,
        "csp": csp(),
        "css": Markup(CSS),
        "script": Markup(SCRIPT),
        "n_rows": len(rows),
        "scope": config.row_filter.describe(),
        "runs": ", ".join(runs) if runs else MISSING,
        "generated_at": generated_at,
        "overview": overview_rows(summary),
        "lines": [line_view(i, line, rows, config) for i, line in enumerate(lines)],
        "model_pairs": [] if rows.empty else rd.model_versions(rows),
        "models": [] if rows.empty else model_views(rows, config),
        "drift": drift_view(drift) if not drift.empty else [],
        "drift_headers": DRIFT_HEADERS,
        "feedback": (
            feedback_view(config.feedback_uri, rows, config) if config.feedback_uri else None
        ),
    }
    return _ENV.get_template("report.html.j2").render(context) + "\n"


def write_report(config: ReportConfig) -> Path:
    """Read the committed scores in scope and write ``{out_dir}/report.html``; return its path.

    Raises ReportError when ``scores_uri`` holds no scoring output at all; an empty scope (no
    rows for the dates or lines asked for) still writes a report that says so.
    """
    rows = load_rows(config)
    generated_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    page = render_html(config, rows, generated_at)
    out = config.out_path
    out.mkdir(parents=True, exist_ok=True)
    target = out / REPORT_FILE
    # The one atomic writer: a browser refreshing the old report never sees half a page.
    storage.write_text_atomic(str(target), page)
    return target
