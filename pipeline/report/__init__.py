"""`dfr-pipeline report`: a static HTML page of the committed scores, for people to look at.

The Parquet rows stay the source of truth; this page is a view of them for QA engineers (the
highest-scoring images with their heatmaps and mask outlines, the error rows and why they
failed) and analysts (counts, anomaly rates over time, score distributions against the
threshold, drift, QA verdicts, what each model version was trained and evaluated on).

The package: ``inputs`` (config, the committed rows) -> ``data`` (the numbers, pure pandas) ->
``images`` (gallery thumbnails), ``plots`` (matplotlib), ``models`` (model.json sections) ->
``page`` (one Jinja2 template, autoescaped, written by storage's atomic writer).
"""

from pipeline.report.inputs import ReportConfig, ReportError, load_rows
from pipeline.report.page import REPORT_FILE, render_html, write_report

__all__ = ["REPORT_FILE", "ReportConfig", "ReportError", "load_rows", "render_html", "write_report"]
