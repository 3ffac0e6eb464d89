"""A small progress printer and the JSONL metrics log (no tqdm at run time).

`Progress` redraws one status line in place on a terminal (at most ten times a second)
and, when its stream is not a terminal (CI, a log file), prints a plain line every
``log_every`` seconds and at each epoch end. `MetricsLog` appends one JSON object per
event to ``metrics.jsonl``; every object carries the run id, so several runs (a first
run and its resumptions) can share one file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, log_every: float = 10.0):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.interactive else log_every
        self._last_draw = 0.0
        self._drawn = False

    def message(self, text: str) -> None:
        """A full line (ends any status line being redrawn)."""
        if not self.enabled:
            return
        self._end_line()
        print(text, file=self.stream, flush=True)

    def update(self, text: str, force: bool = False) -> None:
        """The status line; redrawn at most every ``interval`` seconds unless ``force``."""
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.interval:
            return
        self._last_draw = now
        if self.interactive:
            width = _terminal_width()
            self.stream.write("\r" + text[: width - 1].ljust(width - 1))
            self.stream.flush()
            self._drawn = True
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        self._end_line()

    def _end_line(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _terminal_width() -> int:
    try:
        return max(os.get_terminal_size().columns, 40)
    except OSError:
        return 100


def status_line(
    epoch: int, epochs: int, batch: int, batches: int, loss: float | None, accuracy: float | None, rate: float,
    accuracy_label: str = "acc",
) -> str:
    """``epoch 2/5  [ 40/ 90]  loss 0.4123  acc 87.5%  1523 samples/s`` (segmentation: ``pixel acc``)"""
    width = len(str(batches))
    parts = [f"epoch {epoch}/{epochs}", f"[{batch:>{width}}/{batches}]"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if accuracy is not None:
        parts.append(f"{accuracy_label} {100 * accuracy:.1f}%")
    parts.append(f"{rate:.0f} samples/s")
    return "  ".join(parts)


class MetricsLog:
    """Appends JSON lines to ``path`` (created with its directory on first write)."""

    def __init__(self, path: str | Path | None, run_id: str):
        self.path = Path(path) if path is not None else None
        self.run_id = run_id

    def write(self, event: str, **fields) -> None:
        if self.path is None:
            return
        record = {"run": self.run_id, "event": event, "time": round(time.time(), 3), **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file (for tests and tools)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
