"""What a report reads: its config, and the committed score rows in its scope.

The Parquet rows stay the source of truth; they are read through pipeline.outputs.read_scores,
so rows of a run without a run record (still in flight or crashed) and rows superseded by a
rerun are never shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import outputs, storage
from pipeline.report import data as rd
from pipeline.storage import StorageOptions


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
    """Committed score rows in the config's scope, normalised (see report.data.normalise)."""
    root = scores_root(config.scores_uri, config.storage)
    if not (
        storage.exists(f"{root}/runs", config.storage)
        or storage.exists(f"{root}/scores", config.storage)
    ):
        raise ReportError(f"no scoring output at {root} (expected runs/ and scores/ below it)")
    frame = outputs.read_scores(root, config.run_date, True, config.storage)
    return rd.filter_rows(rd.normalise(frame), config.row_filter)


def short_error(exc: BaseException) -> str:
    """A one-line, redacted note for the page about an object that could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "not found"
    return storage.redact(f"{type(exc).__name__}: {exc}")[:200]
