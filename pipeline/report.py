"""`dfr-pipeline report`: a static HTML page of the committed scores, for people to look at.

The Parquet rows stay the source of truth; this page is a view of them for QA engineers (the
highest-scoring images with their heatmaps and mask outlines, the error rows and why they
failed) and analysts (counts, anomaly rates over time, score distributions against the
threshold, what each model version was trained and evaluated on).

Design notes (the "why"):

* One self-contained file. Thumbnails and plots are inlined as ``data:`` URIs, so the report
  can be mailed, attached to a ticket or opened from disk without its folder. Thumbnails are
  downscaled (``thumb_px``, 256 px by default) so a report stays a few MB.
* No network, enforced: a Content-Security-Policy ``<meta>`` allows only ``data:`` images and
  the one inline stylesheet and script (by hash), so even a data-borne string that escaped
  escaping could not load or run anything. Every string from data is HTML-escaped anyway.
* Never crash on one bad object: an unreadable original, a missing mask or heatmap, or a
  model.json that is gone becomes a visible note in the page, not a failed report.
* Plots with matplotlib's Agg canvas on ``Figure`` objects (not pyplot), so no global state or
  display is involved and the module is safe to call from a long-lived process (the demo).
* The inline script only counts loaded images into ``<body data-images-*>`` on window load; the
  browser test reads those attributes from the dumped DOM.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DateFormatter, DayLocator
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageFilter

from dfr_core.decode import DecodeError, decode_image
from pipeline import outputs, storage
from pipeline import report_data as rd
from pipeline.report_loop import render_loop
from pipeline.storage import StorageOptions

__all__ = ["REPORT_FILE", "ReportConfig", "ReportError", "load_rows", "write_report"]

REPORT_FILE = "report.html"
MODEL_FILE = "model.json"
_OUTLINE_RGB = (255, 48, 48)
_MASK_TINT_RGB = (255, 40, 40)
_MISSING = "—"


class ReportError(ValueError):
    """The report cannot be written at all (e.g. the scores URI holds no scoring output)."""


@dataclass(frozen=True)
class ReportConfig:
    """Everything one report needs; frozen so the demo and the CLI build it the same way.

    ``scores_uri`` is the scoring job's output root (``runs/`` and ``scores/`` below it) or its
    ``scores/`` directory. ``out_dir`` is a local directory: a report is opened from disk.
    """

    scores_uri: str
    out_dir: str
    run_date: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    products: tuple[str, ...] = ()
    models_uri: str | None = None
    top_n: int = 12
    max_error_rows: int = 200
    thumb_px: int = 256
    title: str = "DFR anomaly report"
    storage: StorageOptions | None = None
    feedback_uri: str | None = None  # QA feedback table: lists the reviewed images

    def __post_init__(self) -> None:
        object.__setattr__(self, "products", tuple(self.products))
        rd.RowFilter(self.run_date, self.date_from, self.date_to, self.products)  # validates
        if not self.scores_uri:
            raise ValueError("scores_uri must not be empty")
        if "://" in self.out_dir and not self.out_dir.startswith("file://"):
            raise ValueError(f"out_dir must be a local directory, got {self.out_dir!r}")
        if self.top_n < 0:
            raise ValueError(f"top_n must be >= 0, got {self.top_n}")
        if self.max_error_rows < 0:
            raise ValueError(f"max_error_rows must be >= 0, got {self.max_error_rows}")
        if not 32 <= self.thumb_px <= 2048:
            raise ValueError(f"thumb_px must be in [32, 2048], got {self.thumb_px}")

    @property
    def row_filter(self) -> rd.RowFilter:
        return rd.RowFilter(self.run_date, self.date_from, self.date_to, self.products)

    @property
    def out_path(self) -> Path:
        local = self.out_dir.removeprefix("file://")
        return Path(local).expanduser().resolve()


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def scores_root(uri: str, options: StorageOptions | None = None) -> str:
    """The scoring output root for ``uri``: itself, or its parent when given ``.../scores``.

    An output root that happens to be named ``scores`` is recognised by its ``runs/`` folder.
    """
    root = uri.rstrip("/") or uri
    if storage.exists(f"{root}/runs", options):
        return root
    parent, _, last = root.rpartition("/")
    if last == "scores" and parent and storage.exists(f"{parent}/runs", options):
        return parent
    return root


def load_rows(config: ReportConfig) -> pd.DataFrame:
    """Committed score rows in the config's scope, normalised (see report_data.normalise).

    Goes through pipeline.outputs.read_scores, so rows of a run without a run record (still in
    flight or crashed) and rows superseded by a rerun are never shown.
    """
    root = scores_root(config.scores_uri, config.storage)
    if not (
        storage.exists(f"{root}/runs", config.storage)
        or storage.exists(f"{root}/scores", config.storage)
    ):
        raise ReportError(f"no scoring output at {root} (expected runs/ and scores/ below it)")
    frame = outputs.read_scores(root, config.run_date, True, config.storage)
    return rd.filter_rows(rd.normalise(frame), config.row_filter)


# --------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------


def _e(value: object) -> str:
    """HTML-escape anything (quotes too, so the result is safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def _num(value: object, digits: int = 4) -> str:
    """A number for a table cell; None/NaN become a dash rather than 'nan'."""
    if value is None or (_is_number(value) and not math.isfinite(float(value))):
        return _MISSING
    if isinstance(value, int | np.integer):
        return str(int(value))
    if _is_number(value):
        return f"{float(value):.{digits}g}"
    return _e(value)


def _pct(value: object, digits: int = 1) -> str:
    if value is None or not _is_number(value) or not math.isfinite(float(value)):
        return _MISSING
    return f"{100.0 * float(value):.{digits}f}%"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(src: str, alt: str, css_class: str) -> str:
    return f'<img class="{css_class}" src="{src}" alt="{_e(alt)}">'


# --------------------------------------------------------------------------------------------
# Gallery images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Panel:
    """One picture of a gallery item, or (``src`` None) a note saying why there is none."""

    caption: str
    src: str | None
    note: str = ""


def _jpeg_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=85)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _load_rgb(uri: str, options: StorageOptions | None) -> np.ndarray:
    """Read and decode an image the same way the scoring job does, as (H, W, 3) uint8 (so a
    16-bit or grayscale camera image looks as the model saw it)."""
    from dfr_core.preprocess import to_rgb_uint8  # lazy: torch is only needed for a gallery

    return to_rgb_uint8(decode_image(storage.read_bytes(uri, options)))


def _thumbnail(rgb: np.ndarray, px: int) -> Image.Image:
    image = Image.fromarray(rgb, mode="RGB")
    image.thumbnail((px, px), Image.Resampling.LANCZOS)
    return image


def _load_mask(uri: str, size: tuple[int, int], options: StorageOptions | None) -> np.ndarray:
    """The stored 0/255 mask at thumbnail ``size`` as bool; any covered pixel survives the
    downscale (box filter, then > 0), so a thin scratch does not vanish from the outline."""
    mask = decode_image(storage.read_bytes(uri, options))
    if mask.ndim == 3:
        mask = mask[..., 0]
    image = Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(image.resize(size, Image.Resampling.BOX)) > 0


def _heatmap_candidates(row: pd.Series) -> list[str]:
    """Where a heatmap may be: the row's ``heatmap_uri``, else beside the mask under either
    naming convention (``{id}.heatmap.png`` as pipeline/outputs.py writes, ``{id}_heatmap.png``)."""
    stored = row.get("heatmap_uri")
    if isinstance(stored, str) and stored:
        return [stored]
    mask = row.get("mask_uri")
    if not isinstance(mask, str) or not mask.endswith(".png"):
        return []
    stem = mask[: -len(".png")]
    return [f"{stem}.heatmap.png", f"{stem}_heatmap.png"]


def _load_heatmap(
    row: pd.Series, size: tuple[int, int], options: StorageOptions | None
) -> Image.Image | None:
    for uri in _heatmap_candidates(row):
        try:
            rgb = _load_rgb(uri, options)
        except (OSError, DecodeError, ValueError):
            continue  # no heatmap stored (optional), or an unreadable one: use the mask
        return Image.fromarray(rgb, mode="RGB").resize(size, Image.Resampling.BILINEAR)
    return None


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a bool mask, thickened to about 2 px so it shows on a thumbnail."""
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    eroded = np.asarray(image.filter(ImageFilter.MinFilter(3))) > 0
    edge = mask & ~eroded
    edge_image = Image.fromarray(np.where(edge, 255, 0).astype(np.uint8), mode="L")
    return np.asarray(edge_image.filter(ImageFilter.MaxFilter(3))) > 0


def _paint(thumb: Image.Image, where: np.ndarray, rgb: tuple[int, int, int], alpha: float):
    arr = np.asarray(thumb, dtype=np.float32).copy()
    arr[where] = (1.0 - alpha) * arr[where] + alpha * np.asarray(rgb, dtype=np.float32)
    return Image.fromarray((arr + 0.5).clip(0, 255).astype(np.uint8), mode="RGB")


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return storage.redact(f"{type(exc).__name__}: {exc}")[:200]


def _overlay_panel(thumb: Image.Image, heat: Image.Image | None, mask: np.ndarray | None) -> Panel:
    if heat is not None:
        return Panel("heatmap overlay", _jpeg_uri(Image.blend(thumb, heat, 0.5)))
    if mask is not None:
        tinted = _paint(thumb, mask, _MASK_TINT_RGB, 0.45)
        return Panel("mask overlay (no heatmap stored)", _jpeg_uri(tinted))
    return Panel("heatmap overlay", None, "no heatmap or mask stored for this image")


def _outline_panel(thumb: Image.Image, mask: np.ndarray | None, mask_note: str) -> Panel:
    if mask is None:
        return Panel("mask outline", None, mask_note)
    if not mask.any():
        return Panel("mask outline (empty mask)", _jpeg_uri(thumb))
    return Panel("mask outline", _jpeg_uri(_paint(thumb, _outline(mask), _OUTLINE_RGB, 1.0)))


def gallery_panels(row: pd.Series, config: ReportConfig) -> tuple[Panel, ...]:
    """Original, heatmap overlay and mask outline of one scored image, each downscaled."""
    options = config.storage
    try:
        thumb = _thumbnail(_load_rgb(str(row["image_uri"]), options), config.thumb_px)
    except (OSError, DecodeError, ValueError) as exc:
        note = f"original unavailable: {_short_error(exc)}"
        return (Panel("original", None, note),)
    mask, mask_note = None, "no mask stored for this image"
    mask_uri = row.get("mask_uri")
    if isinstance(mask_uri, str) and mask_uri:
        try:
            mask = _load_mask(mask_uri, thumb.size, options)
        except (OSError, DecodeError, ValueError) as exc:
            mask_note = f"mask unavailable: {_short_error(exc)}"
    heat = _load_heatmap(row, thumb.size, options)
    return (
        Panel("original", _jpeg_uri(thumb)),
        _overlay_panel(thumb, heat, mask),
        _outline_panel(thumb, mask, mask_note),
    )


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _figure(width: float = 5.2, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _data_uri(buf.getvalue(), "image/png")


def histogram_plot(scores: np.ndarray, thresholds: Sequence[float], title: str) -> str | None:
    """Score histogram with the image threshold(s) as dashed lines; None without scores."""
    if scores.size == 0:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    bins = int(np.clip(2 * np.sqrt(scores.size), 10, 60))
    ax.hist(scores, bins=bins, color="#4c78a8")
    for i, threshold in enumerate(thresholds):
        label = "image threshold" if i == 0 else None
        ax.axvline(threshold, color="#d62728", linestyle="--", linewidth=1.5, label=label)
    if thresholds:
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("raw anomaly score")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    return _png_uri(fig)


def _date_axis(ax: Any, dates: np.ndarray) -> None:
    """Day ticks for a short span (AutoDateLocator would tick at hours between two days),
    automatic ticks beyond; half a day of padding so single days are not on the frame."""
    span_days = (dates.max() - dates.min()) / np.timedelta64(1, "D")
    if span_days <= 10:
        ax.xaxis.set_major_locator(DayLocator())
        ax.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
        ax.tick_params(axis="x", labelrotation=30)
    else:
        locator = AutoDateLocator(maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    pad = np.timedelta64(12, "h")
    ax.set_xlim(dates.min() - pad, dates.max() + pad)


def rate_plot(daily: pd.DataFrame, title: str) -> str | None:
    """Anomaly rate per run date (line) over the scored-image volume (grey bars)."""
    if daily.empty or int(daily["ok"].sum()) == 0:
        return None
    dates = pd.to_datetime(daily["run_date"]).to_numpy()
    fig = _figure()
    ax = fig.add_subplot()
    volume = ax.twinx()
    volume.bar(dates, daily["ok"].to_numpy(), width=0.8, color="#bbbbbb", alpha=0.6)
    volume.set_ylabel("scored images", color="#777777")
    volume.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_zorder(volume.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.plot(dates, 100.0 * daily["anomaly_rate"].to_numpy(dtype=float), marker="o", color="#d62728")
    ax.set_ylabel("anomaly rate (%)")
    ax.set_ylim(bottom=0)
    _date_axis(ax, dates)
    ax.set_title(title, fontsize="medium")
    return _png_uri(fig)


def curve_plot(
    x: Sequence[float], y: Sequence[float], labels: tuple[str, str], title: str, diagonal: bool
) -> str:
    """A ROC- or PRO-style curve on [0, 1] axes (the PRO x range is its own)."""
    fig = _figure(3.6, 3.0)
    ax = fig.add_subplot()
    ax.plot(x, y, color="#4c78a8", linewidth=2)
    if diagonal:
        ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, max(max(x, default=1.0), 1e-6))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize="medium")
    return _png_uri(fig)


def loss_plot(history: Sequence[dict[str, Any]], best_epoch: object) -> str | None:
    """Train (and validation) loss per epoch, with the kept epoch marked."""
    points = [h for h in history if isinstance(h, dict) and _is_number(h.get("train_loss"))]
    if not points:
        return None
    fig = _figure(3.6, 3.0)
    ax = fig.add_subplot()
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(points)]
    ax.plot(epochs, [float(h["train_loss"]) for h in points], label="train loss")
    val = [(e, h.get("val_loss")) for e, h in zip(epochs, points, strict=True)]
    val = [(e, float(v)) for e, v in val if _is_number(v)]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], label="validation loss")
    if _is_number(best_epoch):
        ax.axvline(float(best_epoch), color="#999999", linestyle="--", label="kept epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.set_title("training loss", fontsize="medium")
    return _png_uri(fig)


# --------------------------------------------------------------------------------------------
# Model versions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """One model version's model.json (or why it could not be read)."""

    product_line: str
    version: str
    meta: dict[str, Any] | None
    problem: str = ""


def read_model_info(
    models_uri: str, product_line: str, version: str, options: StorageOptions | None
) -> ModelInfo:
    """Read ``{models_uri}/{line}/{version}/model.json``; failures become a visible note."""
    try:
        uri = storage.join_uri(models_uri, product_line, version, MODEL_FILE)
        meta = json.loads(storage.read_text(uri, options))
        if not isinstance(meta, dict):
            raise ValueError("model.json is not a JSON object")
    except (OSError, ValueError) as exc:
        return ModelInfo(
            product_line, version, None, f"model.json unavailable: {_short_error(exc)}"
        )
    return ModelInfo(product_line, version, meta)


def _curve(spec: object, x_key: str, y_key: str) -> tuple[list[float], list[float]] | None:
    """A stored curve ``{x_key: [...], y_key: [...]}`` if it is well formed, else None."""
    if not isinstance(spec, dict):
        return None
    x, y = spec.get(x_key), spec.get(y_key)
    if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y) or len(x) < 2:
        return None
    if not all(_is_number(v) and math.isfinite(float(v)) for v in [*x, *y]):
        return None
    return [float(v) for v in x], [float(v) for v in y]


def _section(obj: object) -> dict[str, Any]:
    return obj if isinstance(obj, dict) else {}


# --------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;
background:#fafafa}
header,main{max-width:1200px;margin:0 auto;padding:0 16px}
header{padding-top:12px}
h1{margin:8px 0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0;background:#fff}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555;font-size:0.9em}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plot{background:#fff;border:1px solid #ddd;max-width:100%}
.note{color:#666;font-style:italic}
.gallery{display:flex;flex-direction:column;gap:12px}
.item{background:#fff;border:1px solid #ddd;padding:8px;margin:0}
.panels{display:flex;flex-wrap:wrap;gap:8px}
.panel{margin:0;text-align:center}
.panel figcaption{font-size:0.8em;color:#555}
.thumb{max-width:256px;max-height:256px;display:block}
.missing{width:200px;height:120px;display:flex;align-items:center;justify-content:center;
border:1px dashed #bbb;color:#777;font-size:0.8em;padding:4px;box-sizing:border-box}
.caption{font-size:0.9em;margin-top:6px}
.anomaly{color:#b00;font-weight:bold}
code{word-break:break-all;font-size:0.85em}
.errors td{font-size:0.85em}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; });
  var body = document.body;
  body.setAttribute("data-images-total", String(images.length));
  body.setAttribute("data-images-loaded", String(loaded.length));
  body.setAttribute("data-images-broken", String(images.length - loaded.length));
});
"""


def _csp_hash(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


def _csp() -> str:
    """Only data: images, and only our own inline style and script (pinned by hash)."""
    return (
        "default-src 'none'; img-src data:; "
        f"style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_SCRIPT)}; "
        "base-uri 'none'; form-action 'none'"
    )


def _table(headers: Sequence[str], rows: Iterable[str], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cls = f' class="{css_class}"' if css_class else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _kv_table(pairs: Sequence[tuple[str, str]], field_prefix: str) -> str:
    """Two-column table; values are pre-formatted HTML, keys plain text."""
    rows = [
        f'<tr><th>{_e(k)}</th><td data-field="{_e(field_prefix + k)}">{v}</td></tr>'
        for k, v in pairs
    ]
    return f"<table><tbody>{''.join(rows)}</tbody></table>"


def _cell(field: str, value: str, numeric: bool = True) -> str:
    cls = ' class="num"' if numeric else ""
    return f'<td{cls} data-field="{field}">{value}</td>'


def _plot_or_note(src: str | None, alt: str, note: str) -> str:
    return _img(src, alt, "plot") if src else f'<p class="note">{_e(note)}</p>'


def render_overview(summary: pd.DataFrame) -> str:
    """The per-line count table at the top (cells carry data-field for the browser test)."""
    rows = []
    for i, r in enumerate(summary.itertuples(index=False)):
        versions = ", ".join(r.model_versions) if r.model_versions else _MISSING
        rows.append(
            f'<tr data-line="{_e(r.product_line)}">'
            f'<td><a href="#line-{i}">{_e(r.product_line)}</a></td>'
            + _cell("rows", _num(r.rows))
            + _cell("ok", _num(r.ok))
            + _cell("anomalies", _num(r.anomalies))
            + _cell("anomaly_rate", _pct(r.anomaly_rate))
            + _cell("errors", _num(r.errors))
            + _cell("dates", f"{_e(r.first_date)} to {_e(r.last_date)} ({_num(r.dates)})", False)
            + _cell("model_versions", _e(versions), False)
            + "</tr>"
        )
    headers = (
        "product line", "rows", "scored ok", "anomalies", "anomaly rate", "errors",
        "run dates", "model versions",
    )  # fmt: skip
    return _table(headers, rows, "overview")


def render_daily(daily: pd.DataFrame) -> str:
    rows = [
        f'<tr data-date="{_e(r.run_date)}"><td>{_e(r.run_date)}</td>'
        + _cell("rows", _num(r.rows))
        + _cell("ok", _num(r.ok))
        + _cell("anomalies", _num(r.anomalies))
        + _cell("anomaly_rate", _pct(r.anomaly_rate))
        + _cell("errors", _num(r.errors))
        + "</tr>"
        for r in daily.itertuples(index=False)
    ]
    headers = ("run date", "rows", "scored ok", "anomalies", "anomaly rate", "errors")
    return _table(headers, rows, "daily")


def _panel_html(panel: Panel, alt: str) -> str:
    body = (
        _img(panel.src, f"{panel.caption}: {alt}", "thumb")
        if panel.src
        else f'<div class="missing">{_e(panel.note)}</div>'
    )
    return f'<figure class="panel">{body}<figcaption>{_e(panel.caption)}</figcaption></figure>'


def render_item(row: pd.Series, panels: Sequence[Panel]) -> str:
    """One gallery entry: pictures side by side, then score, verdict and the image URI."""
    verdict = '<span class="anomaly">anomalous</span>' if row["is_anomaly"] else "normal"
    area = row.get("defect_area_fraction")
    area_text = f", defect area {_pct(area, 2)}" if _is_number(area) else ""
    caption = (
        f'<div class="caption">#{int(row["rank"])} &middot; score <b>{_num(row["score"])}</b> '
        f"(threshold {_num(row['threshold'])}) &middot; {verdict}{area_text} &middot; "
        f"{_e(row['run_date'])} &middot; id <code>{_e(row['image_id'])}</code><br>"
        f"<code>{_e(row['image_uri'])}</code></div>"
    )
    pictures = "".join(_panel_html(p, str(row["image_id"])) for p in panels)
    return (
        f'<figure class="item" data-rank="{int(row["rank"])}" '
        f'data-score="{_e(repr(float(row["score"])))}" data-image-id="{_e(row["image_id"])}">'
        f'<div class="panels">{pictures}</div>{caption}</figure>'
    )


def render_gallery(top: pd.DataFrame, config: ReportConfig) -> str:
    if config.top_n == 0:
        return ""
    if top.empty:
        return '<p class="note">No successfully scored images to show.</p>'
    items = [render_item(row, gallery_panels(row, config)) for _, row in top.iterrows()]
    return f'<div class="gallery">{"".join(items)}</div>'


def render_errors(errors: pd.DataFrame, reasons: pd.DataFrame, limit: int) -> str:
    """Reason counts, then the failed rows (at most ``limit``) with their messages."""
    if errors.empty:
        return '<p class="note">No error rows.</p>'
    reason_rows = [
        f'<tr data-reason="{_e(r.reason)}"><td><code>{_e(r.reason)}</code></td>'
        + _cell("count", _num(r.count))
        + "</tr>"
        for r in reasons.itertuples(index=False)
    ]
    shown = errors.head(limit)
    rows = [
        f"<tr><td>{_e(r.run_date)}</td><td><code>{_e(r.image_id)}</code></td>"
        f"<td><code>{_e(r.reason)}</code></td><td>{_e(r.error)}</td>"
        f"<td><code>{_e(r.image_uri)}</code></td></tr>"
        for r in shown.itertuples(index=False)
    ]
    more = len(errors) - len(shown)
    tail = (
        f'<p class="note">{more} more error rows not listed (the Parquet has them all).</p>'
        if more > 0
        else ""
    )
    return (
        _table(("reason", "rows"), reason_rows, "reasons")
        + _table(("run date", "image id", "reason", "message", "image URI"), rows, "errors")
        + tail
    )


def render_line(index: int, line: str, rows: pd.DataFrame, config: ReportConfig) -> str:
    """One product line: counts by date, histogram, rate over time, gallery, errors."""
    own = rows[rows["product_line"] == line]
    daily = rd.daily_rates(own)
    histogram = histogram_plot(
        rd.scores_of(own, line), rd.thresholds_of(own, line), f"{line}: score distribution"
    )
    rates = rate_plot(daily, f"{line}: anomaly rate by run date")
    plots = (
        '<div class="plots">'
        + _plot_or_note(histogram, f"{line} score histogram", "No scored images: no histogram.")
        + _plot_or_note(rates, f"{line} anomaly rate by date", "No scored images: no rates.")
        + "</div>"
    )
    top = rd.top_n(own, config.top_n)
    return (
        f'<section class="line" id="line-{index}" data-line="{_e(line)}">'
        f"<h2>Product line {_e(line)}</h2>"
        + render_daily(daily)
        + plots
        + f"<h3>Top {config.top_n} highest scores</h3>"
        + render_gallery(top, config)
        + "<h3>Errors</h3>"
        + render_errors(rd.error_rows(own), rd.reason_counts(own), config.max_error_rows)
        + "</section>"
    )


def _training_pairs(meta: dict[str, Any]) -> list[tuple[str, str]]:
    backbone = _section(meta.get("backbone"))
    model_config = _section(meta.get("model_config"))
    training = _section(meta.get("training"))
    extra = _section(meta.get("extra"))
    layers = backbone.get("layers")
    layer_text = ", ".join(map(str, layers)) if isinstance(layers, list) else None
    return [
        ("backbone", _e(backbone.get("name") or _MISSING)),
        ("layers", _e(layer_text or _MISSING)),
        ("image size", _num(model_config.get("image_size"))),
        ("latent dim", _num(meta.get("latent_dim"))),
        ("train images", _num(training.get("train_images"))),
        ("validation images", _num(training.get("val_images"))),
        ("epochs run", _num(training.get("epochs_run"))),
        ("best epoch", _num(training.get("best_epoch"))),
        ("best loss", _num(training.get("best_loss"))),
        ("created at", _e(extra.get("created_at") or _MISSING)),
    ]


def _calibration_pairs(calibration: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("image threshold", _num(calibration.get("image_threshold"))),
        ("pixel threshold", _num(calibration.get("pixel_threshold"))),
        ("image FPR target", _num(calibration.get("image_fpr"))),
        ("pixel FPR target", _num(calibration.get("pixel_fpr"))),
        ("calibration images", _num(calibration.get("n_images"))),
        ("method", _e(calibration.get("method") or _MISSING)),
    ]


def _metric_pairs(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("image AUROC", _num(metrics.get("image_auroc"))),
        ("pixel AUROC", _num(metrics.get("pixel_auroc"))),
        ("PRO (AUPRO)", _num(metrics.get("pro"))),
        ("pixel F1", _num(metrics.get("f1"))),
        ("pixel IoU", _num(metrics.get("iou"))),
        ("test images", _num(metrics.get("n_images"))),
        ("anomalous test images", _num(metrics.get("n_anomalous"))),
    ]


def _curve_plots(metrics: dict[str, Any], name: str) -> list[str]:
    """ROC and PRO plots from ``metrics.curves`` when the training job stored them."""
    curves = _section(metrics.get("curves"))
    plots = []
    roc = _curve(curves.get("roc"), "fpr", "tpr")
    if roc:
        title = f"image ROC (AUROC {_num(metrics.get('image_auroc'), 3)})"
        plots.append(curve_plot(*roc, ("false positive rate", "true positive rate"), title, True))
    pixel_roc = _curve(curves.get("pixel_roc"), "fpr", "tpr")
    if pixel_roc:
        title = f"pixel ROC (AUROC {_num(metrics.get('pixel_auroc'), 3)})"
        labels = ("pixel false positive rate", "pixel true positive rate")
        plots.append(curve_plot(*pixel_roc, labels, title, True))
    pro = _curve(curves.get("pro"), "fpr", "pro")
    if pro:
        title = f"PRO curve (AUPRO {_num(metrics.get('pro'), 3)})"
        plots.append(curve_plot(*pro, ("pixel false positive rate", "PRO"), title, False))
    return [_img(src, f"{name} curve", "plot") for src in plots]


def render_model(info: ModelInfo) -> str:
    """Training summary, calibration and evaluation (with curves) of one model version."""
    name = f"{info.product_line} / {info.version}"
    head = (
        f'<section class="model" data-line="{_e(info.product_line)}" '
        f'data-version="{_e(info.version)}"><h3>{_e(name)}</h3>'
    )
    if info.meta is None:
        return head + f'<p class="note">{_e(info.problem)}</p></section>'
    meta = info.meta
    metrics = _section(meta.get("metrics"))
    training = _section(meta.get("training"))
    calibration = _section(meta.get("calibration"))
    has_eval = any(_is_number(metrics.get(k)) for k in ("image_auroc", "pixel_auroc", "pro"))
    evaluation = (
        _kv_table(_metric_pairs(metrics), "metric:")
        if has_eval
        else '<p class="note">No labelled test set was given: no evaluation metrics.</p>'
    )
    history = training.get("history")
    loss = loss_plot(history if isinstance(history, list) else [], training.get("best_epoch"))
    plots = ([_img(loss, f"{name} training loss", "plot")] if loss else []) + _curve_plots(
        metrics, name
    )
    curves_note = (
        ""
        if not has_eval or len(plots) > (1 if loss else 0)
        else '<p class="note">No ROC/PRO curves stored in model.json: numbers only.</p>'
    )
    return (
        head
        + "<h4>Training</h4>"
        + _kv_table(_training_pairs(meta), "training:")
        + "<h4>Calibration</h4>"
        + (
            _kv_table(_calibration_pairs(calibration), "calibration:")
            if calibration
            else '<p class="note">Not calibrated.</p>'
        )
        + "<h4>Evaluation</h4>"
        + evaluation
        + curves_note
        + (f'<div class="plots">{"".join(plots)}</div>' if plots else "")
        + "</section>"
    )


def render_models(rows: pd.DataFrame, config: ReportConfig) -> str:
    pairs = rd.model_versions(rows)
    if not pairs:
        return ""
    intro = "<h2>Model versions</h2>"
    if not config.models_uri:
        names = ", ".join(f"{line} / {version}" for line, version in pairs)
        note = f"Model versions used: {names}. Pass --models-uri to include their details."
        return intro + f'<p class="note">{_e(note)}</p>'
    sections = [
        render_model(read_model_info(config.models_uri, line, version, config.storage))
        for line, version in pairs
    ]
    return intro + "".join(sections)


def render_header(config: ReportConfig, rows: pd.DataFrame, generated_at: str) -> str:
    runs = sorted({r for r in rows["run_id"] if isinstance(r, str)})
    run_text = ", ".join(runs) if runs else _MISSING
    return (
        f"<header><h1>{_e(config.title)}</h1>"
        f'<p class="meta">Scores: <code>{_e(config.scores_uri)}</code><br>'
        f"Scope: {_e(config.row_filter.describe())}<br>"
        f"Committed runs: <code>{_e(run_text)}</code><br>"
        f"Generated: {_e(generated_at)}<br>"
        "Anomaly rate = anomalous images / successfully scored images (error rows are "
        "excluded; a line with only errors has no rate). Scores are raw DFR scores; an image is "
        "anomalous when its score exceeds its model's image threshold.</p></header>"
    )


def render_html(config: ReportConfig, rows: pd.DataFrame, generated_at: str) -> str:
    """The whole page for normalised, filtered ``rows``."""
    summary = rd.line_summary(rows)
    if rows.empty:
        body = '<p class="note" id="empty">No committed score rows match this scope.</p>'
    else:
        lines = list(summary["product_line"])
        body = (
            "<h2>Overview</h2>"
            + render_overview(summary)
            + "".join(render_line(i, line, rows, config) for i, line in enumerate(lines))
            + render_models(rows, config)
        )
    body += render_loop(config, scores_root(config.scores_uri, config.storage), rows)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_csp())}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(config.title)}</title><style>{_CSS}</style></head>"
        f'<body data-rows="{len(rows)}">'
        + render_header(config, rows, generated_at)
        + f"<main>{body}</main>"
        + f"<script>{_SCRIPT}</script></body></html>\n"
    )


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
