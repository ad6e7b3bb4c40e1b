"""Training progress from Ray tasks to the driver's terminal, and plain-text tables.

Tasks send small event dicts to one ProgressLog actor (fire and forget, so a slow terminal
never slows training); the driver drains the actor while it waits for results and prints one
line per event. The actor takes no CPU reservation, so on a small machine it can never be what
a training task waits for.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from dfr_core.train import EpochStats

Event = dict[str, Any]
Echo = Callable[[str], None]


class ProgressLog:
    """Event buffer living in a Ray actor (wrap with ray.remote(num_cpus=0))."""

    def __init__(self) -> None:
        self._events: list[Event] = []

    def report(self, event: Event) -> None:
        self._events.append(event)

    def drain(self) -> list[Event]:
        events, self._events = self._events, []
        return events


class TaskReporter:
    """Used inside a training task: sends stage and epoch events for one product line."""

    def __init__(self, actor: Any | None, product_line: str) -> None:
        self._actor = actor
        self._line = product_line

    def _send(self, event: Event) -> None:
        if self._actor is not None:
            self._actor.report.remote({"product_line": self._line, "time": time.time(), **event})

    def stage(self, name: str) -> None:
        self._send({"kind": "stage", "stage": name})

    def epoch(self, stats: EpochStats) -> None:
        self._send({"kind": "epoch", **stats._asdict()})


def format_seconds(seconds: float | None) -> str:
    """12s, 3m05s, 1h02m: short enough for a progress line."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class ProgressPrinter:
    """Driver side: one line per event; epoch lines throttled per product line.

    The ETA is the mean epoch time times the epochs left, an upper bound when early stopping
    ends training sooner.
    """

    def __init__(self, echo: Echo, min_interval_s: float = 2.0) -> None:
        self._echo = echo
        self._min_interval = min_interval_s
        self._last_print: dict[str, float] = {}
        self._epoch_seconds: dict[str, list[float]] = {}
        self._width = 12

    def handle(self, event: Event) -> None:
        line = str(event.get("product_line", "?"))
        self._width = max(self._width, len(line))
        name = line.ljust(self._width)
        if event.get("kind") == "stage":
            self._echo(f"{name}  {event.get('stage')}")
            return
        if event.get("kind") != "epoch":
            return
        epoch, epochs = int(event["epoch"]), int(event["epochs"])
        times = self._epoch_seconds.setdefault(line, [])
        times.append(float(event.get("seconds") or 0.0))
        now = time.monotonic()
        due = now - self._last_print.get(line, -math.inf) >= self._min_interval
        if not (due or epoch == 1 or epoch == epochs):
            return
        self._last_print[line] = now
        eta = sum(times) / len(times) * (epochs - epoch)
        val = event.get("val_loss")
        val_text = f"  val {val:.4f}" if val is not None else ""
        self._echo(
            f"{name}  epoch {epoch}/{epochs}  loss {event['train_loss']:.4f}{val_text}"
            f"  ETA {format_seconds(eta)}"
        )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned plain-text table; None prints as '-', floats with 4 significant digits."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)
