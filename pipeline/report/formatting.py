"""How numbers read in the report's cells. Plain text out: the template escapes everything."""

from __future__ import annotations

import math

import numpy as np

MISSING = "—"


def is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def num(value: object, digits: int = 4) -> str:
    """A number for a table cell; None/NaN become a dash rather than 'nan'."""
    if value is None or (is_number(value) and not math.isfinite(float(value))):
        return MISSING
    if isinstance(value, int | np.integer):
        return str(int(value))
    if is_number(value):
        return f"{float(value):.{digits}g}"
    return str(value)


def pct(value: object, digits: int = 1) -> str:
    if value is None or not is_number(value) or not math.isfinite(float(value)):
        return MISSING
    return f"{100.0 * float(value):.{digits}f}%"


def stat(value: object, digits: int = 3) -> str:
    """A statistic in the drift and feedback tables (3 significant digits; '-' when absent)."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{float(value):.{digits}g}" if isinstance(value, float) else str(value)
