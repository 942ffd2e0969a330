"""Progress on stderr, when desync would show it.

Shown when stderr is a terminal, or DESYNC_PROGRESSBAR_ENABLED is set: a tqdm bar (fits the
terminal, shows bytes or chunks, the rate and the time left), or when DESYNC_ENABLE_PARSABLE_PROGRESS
is set: then one plain line every 500 ms, `<prefix>  <percent>% <time>`, e.g.
`Attempt 1: Assembling   34.22% 01m02s`, exactly desync's, the format RAUC and SteamOS's updater
parse (the time is the estimate left, and the time taken once at 100%). The library reports work
through a callback (`progress(n)`); this module draws it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO


def progress_mode(stream: TextIO | None = None) -> str | None:
    """'lines' (parsable), 'bar', or None (no progress)."""
    stream = stream or sys.stderr
    if os.environ.get("DESYNC_ENABLE_PARSABLE_PROGRESS"):
        return "lines"
    if os.environ.get("DESYNC_PROGRESSBAR_ENABLED"):
        return "bar"
    try:
        return "bar" if stream.isatty() else None
    except (AttributeError, ValueError):
        return None


class CountingReader:
    """A binary stream that reports the bytes read through it (read and read1)."""

    def __init__(self, raw: object, add: Callable[[int], None]):
        self.raw = raw
        self.add = add
        if hasattr(raw, "read1"):
            self.read1 = self._read1

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)  # type: ignore[attr-defined]  # (any reader)
        self.add(len(data))
        return data

    def _read1(self, n: int = -1) -> bytes:
        data = self.raw.read1(n)  # type: ignore[attr-defined]  # (only set when it has read1)
        self.add(len(data))
        return data


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60:02d}m{seconds % 60:02d}s"


class Progress:
    """Counts work done out of `total` and draws it from a background thread while open.

    Use as a context manager; pass `progress.add` to library calls. Does nothing when
    progress is not wanted (`mode` None). `unit` is what is counted ("bytes", "chunks",
    "chunks deleted"); `label` names the bar (the prefix by default)."""

    def __init__(self, prefix: str, total: int | None, mode: str | None = "auto",
                 stream: TextIO | None = None, unit: str = "chunks", label: str | None = None):
        self.prefix = prefix
        self.total = None if total is None else max(0, total)
        self.unit = unit
        self.label = (label if label is not None else prefix).strip()
        self.stream = stream or sys.stderr
        self.mode = progress_mode(self.stream) if mode == "auto" else mode
        self.done = 0
        self._drawn = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar: object = None
        self._started = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def callback(self) -> Callable[[int], None] | None:
        """`add` when drawing, else None (the library then skips the calls)."""
        return self.add if self.enabled else None

    def line(self) -> str:
        """The current state as desync's parsable line (a count when the total is unknown)."""
        if self.total is None:
            return f"{self.prefix}  {self.done} {self.unit} {_clock(time.monotonic() - self._started)}"
        done = min(self.done, self.total) if self.total else self.done
        fraction = done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self._started
        text = f"{self.prefix}  {100 * fraction:.2f}%"
        if fraction >= 1:
            return f"{text} {_clock(elapsed)}"
        if done and elapsed > 0:
            return f"{text} {_clock(elapsed / fraction - elapsed)}"
        return text

    def _draw(self) -> None:
        if self.mode == "lines":
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            return
        with self._lock:
            delta, self._drawn = self.done - self._drawn, self.done
        if delta:
            self._bar.update(delta)  # type: ignore[attr-defined]  # (tqdm has no types)

    def _open_bar(self) -> None:
        from tqdm import tqdm  # only for a terminal (or DESYNC_PROGRESSBAR_ENABLED)

        in_bytes = self.unit == "bytes"
        self._bar = tqdm(total=self.total, desc=self.label or "Copying",
                         unit="B" if in_bytes else " " + self.unit, unit_scale=in_bytes, unit_divisor=1024,
                         dynamic_ncols=True, file=self.stream, mininterval=0.2, leave=True)

    def _run(self) -> None:
        interval = 0.5 if self.mode == "lines" else 0.2
        while not self._stop.wait(interval):
            self._draw()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._started = time.monotonic()
            if self.mode == "bar":
                self._open_bar()
            self._thread = threading.Thread(target=self._run, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if kind is None:
            self.done = max(self.done, self.total or 0)
            self._draw()
        if self._bar is not None:
            self._bar.close()  # type: ignore[attr-defined]  # (tqdm has no types)
