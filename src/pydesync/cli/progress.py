"""Progress on stderr, when desync would show it.

Shown when stderr is a terminal, or DESYNC_PROGRESSBAR_ENABLED is set (a bar redrawn in place
every 200 ms), or DESYNC_ENABLE_PARSABLE_PROGRESS is set: then one plain line every 500 ms,
`<prefix>  <percent>% <time>`, e.g. `Attempt 1: Assembling   34.22% 01m02s`, the format RAUC
and SteamOS's updater parse (the time is the estimate left, and the time taken once at 100%).
The library reports work through a callback (`progress(n)`); this module draws it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

BAR_WIDTH = 30


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
        data = self.raw.read(n)  # type: ignore[attr-defined]
        self.add(len(data))
        return data

    def _read1(self, n: int = -1) -> bytes:
        data = self.raw.read1(n)  # type: ignore[attr-defined]
        self.add(len(data))
        return data


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60:02d}m{seconds % 60:02d}s"


class Progress:
    """Counts work done out of `total` and draws it from a background thread while open.

    Use as a context manager; pass `progress.add` to library calls. Does nothing when
    progress is not wanted (`mode` None)."""

    def __init__(self, prefix: str, total: int | None, mode: str | None = "auto",
                 stream: TextIO | None = None, unit: str = ""):
        self.prefix = prefix
        self.total = None if total is None else max(0, total)
        self.unit = unit  # for unknown totals: what is counted
        self.stream = stream or sys.stderr
        self.mode = progress_mode(self.stream) if mode == "auto" else mode
        self.done = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
            return f"{self.prefix}  {self.done}{self.unit} {_clock(time.monotonic() - self._started)}"
        done = min(self.done, self.total) if self.total else self.done
        fraction = done / self.total if self.total else 1.0
        elapsed = time.monotonic() - self._started
        text = f"{self.prefix}  {100 * fraction:.2f}%"
        if fraction >= 1:
            return f"{text} {_clock(elapsed)}"
        if done and elapsed > 0:
            return f"{text} {_clock(elapsed / fraction - elapsed)}"
        return text

    def _draw(self, final: bool = False) -> None:
        if self.mode == "lines":
            self.stream.write(self.line() + "\n")
        else:
            fraction = min(1.0, self.done / self.total) if self.total else 1.0 if self.total == 0 else 0.0
            filled = int(BAR_WIDTH * fraction)
            bar = "=" * filled + (">" if filled < BAR_WIDTH else "") + " " * (BAR_WIDTH - filled - 1)
            head, _, tail = self.line().partition("  ")
            self.stream.write(f"\r{head} [{bar}] {tail}\x1b[K" + ("\n" if final else ""))
        self.stream.flush()

    def _run(self) -> None:
        interval = 0.5 if self.mode == "lines" else 0.2
        while not self._stop.wait(interval):
            self._draw()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._started = time.monotonic()
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
            self._draw(final=True)
        elif self.mode == "bar":
            self.stream.write("\n")
