"""The report's plots: matplotlib's Agg canvas on ``Figure`` objects (not pyplot), so no global
state or display is involved and it is safe to call from a long-lived process (the demo). Each
returns a PNG ``data:`` URI, or None when there is nothing to plot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, DateFormatter, DayLocator
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.report.formatting import is_number
from pipeline.report.images import data_uri


def _figure(width: float = 5.2, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return data_uri(buf.getvalue(), "image/png")


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
    points = [h for h in history if isinstance(h, dict) and is_number(h.get("train_loss"))]
    if not points:
        return None
    fig = _figure(3.6, 3.0)
    ax = fig.add_subplot()
    epochs = [int(h.get("epoch", i + 1)) for i, h in enumerate(points)]
    ax.plot(epochs, [float(h["train_loss"]) for h in points], label="train loss")
    val = [(e, h.get("val_loss")) for e, h in zip(epochs, points, strict=True)]
    val = [(e, float(v)) for e, v in val if is_number(v)]
    if val:
        ax.plot([e for e, _ in val], [v for _, v in val], label="validation loss")
    if is_number(best_epoch):
        ax.axvline(float(best_epoch), color="#999999", linestyle="--", label="kept epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize="small")
    ax.set_title("training loss", fontsize="medium")
    return _png_uri(fig)
