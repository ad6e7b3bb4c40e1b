"""The report's operating-loop sections: drift per product line over run dates, and the images
QA reviewed with their verdicts (and their latest score, when the scores in scope have them).

Plain HTML with the report's table classes; pipeline.report calls :func:`render_loop`.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

from pipeline.drift_io import read_drift
from pipeline.feedback import load_feedback
from pipeline.input_stats import STAT_NAMES
from pipeline.storage import StorageOptions


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{float(value):.{digits}g}" if isinstance(value, float) else _e(value)


def _table(headers: tuple[str, ...], rows: list[str], css: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return (
        f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def _in_scope(frame: pd.DataFrame, flt: Any) -> pd.DataFrame:
    keep = pd.Series(True, index=frame.index)
    if flt.run_date:
        keep &= frame["run_date"] == flt.run_date
    if flt.date_from:
        keep &= frame["run_date"] >= flt.date_from
    if flt.date_to:
        keep &= frame["run_date"] <= flt.date_to
    if flt.products:
        keep &= frame["product_line"].isin(flt.products)
    return frame[keep]


def render_drift(drift: pd.DataFrame) -> str:
    """One table per product line: its drift statistics per run date, drifted dates marked."""
    if drift.empty:
        return ""
    parts = ["<h2>Drift per product line</h2>",
             '<p class="note">Each run compares its ok rows with the model\'s calibration '
             "reference (docs/operating.md): anomaly-rate binomial test, KS tests of the "
             "scores and input statistics.</p>"]  # fmt: skip
    headers = ("run date", "images", "anomaly rate", "expected", "p (rate)", "score KS",
               *(f"{n} KS" for n in STAT_NAMES), "drifted", "reasons")  # fmt: skip
    for line, group in drift.groupby("product_line", sort=True):
        rows = []
        for r in group.sort_values("run_date").to_dict("records"):
            flag = '<span class="anomaly">DRIFT</span>' if r["drifted"] else "no"
            cells = [r["n_ok"], r["anomaly_rate"], r["expected_rate"], r["anomaly_p"],
                     r["score_ks"], *(r[f"{n}_ks"] for n in STAT_NAMES)]  # fmt: skip
            rows.append(
                f'<tr data-drift-date="{_e(r["run_date"])}" '
                f'data-drifted="{str(r["drifted"]).lower()}">'
                f"<td>{_e(r['run_date'])}</td>"
                + "".join(f'<td class="num">{_f(c)}</td>' for c in cells)
                + f"<td>{flag}</td><td>{_e(r['reasons'] or r['note'] or '')}</td></tr>"
            )
        parts.append(f"<h3>{_e(line)}</h3>" + _table(headers, rows, "drift"))
    return "".join(parts)


def render_feedback(feedback_uri: str, rows: pd.DataFrame, options: StorageOptions | None) -> str:
    """The reviewed images, their verdicts, and their latest score in scope (if scored)."""
    feedback = load_feedback(feedback_uri, None, options)
    latest: dict[str, dict[str, Any]] = {}
    if not rows.empty and "image_uri" in rows:
        for r in rows.sort_values("run_date").to_dict("records"):
            latest[r["image_uri"]] = r
    body = []
    for f in feedback.rows:
        scored = latest.get(f.image_uri) or {}
        flagged = scored.get("is_anomaly")
        body.append(
            f'<tr data-verdict="{_e(f.label)}"><td>{_e(f.product_line)}</td>'
            f"<td><code>{_e(f.image_uri)}</code></td><td>{_e(f.label)}</td>"
            f"<td>{_e(f.reviewer or '')}</td><td>{_e(f.reviewed_at or '')}</td>"
            f'<td class="num">{_f(scored.get("score"))}</td>'
            f"<td>{'-' if flagged is None else ('yes' if flagged else 'no')}</td></tr>"
        )
    headers = ("product line", "image", "verdict", "reviewer", "reviewed at", "score",
               "flagged")  # fmt: skip
    return (f"<h2>QA feedback</h2><p class=\"meta\">{_e(feedback.uri)} "
            f"(sha256 {feedback.sha256[:12]}, {len(feedback.rows)} verdicts)</p>"
            + _table(headers, body, "feedback"))  # fmt: skip


def render_loop(config: Any, root: str, rows: pd.DataFrame) -> str:
    """Drift (always, when the output has any) and feedback (when the config names a table)."""
    drift = _in_scope(read_drift(root, config.storage), config.row_filter)
    out = render_drift(drift)
    if getattr(config, "feedback_uri", None):
        out += render_feedback(config.feedback_uri, rows, config.storage)
    return out
