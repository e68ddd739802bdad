"""Progress of the slow steps of a first start (fetch, dequantize, warm-up).

A bar on a terminal; JSON log lines (a start line, about one a second while it runs, an end line) otherwise,
so that a container's log shows where a start is and how long each step took.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import TextIO

log = logging.getLogger("tokenstream.progress")

BAR_WIDTH = 30


def _amount(n: float, unit: str) -> str:
    if unit == "bytes":
        for scale, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if n >= scale:
                return f"{n / scale:.1f} {suffix}"
        return f"{int(n)} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{int(n)}"


class Progress:
    """One step of a start; `total=None` for a step whose size is unknown (then only elapsed time shows).

    Use as a context manager; `update(n)` adds n units of work. The end line is written on exit, with `failed`
    set when the step raised.
    """

    def __init__(self, step: str, total: float | None = None, unit: str = "", *, stream: TextIO | None = None,
                 interval_s: float = 1.0) -> None:
        self.step, self.total, self.unit = step, total, unit
        self.done = 0.0
        self._stream = stream if stream is not None else sys.stderr
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        # A terminal redraws often enough to look alive; a log gets about one line per interval.
        self._interval_s = 0.1 if self._tty else interval_s
        self._start = self._last = time.monotonic()
        self._closed = False

    def __enter__(self) -> Progress:
        if self._tty:
            self._draw()
        else:
            log.info("%s: started", self.step, extra={"fields": self._fields(event="start")})
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc is not None)

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return
        self._last = now
        if self._tty:
            self._draw()
        else:
            log.info("%s: %s", self.step, self._summary(), extra={"fields": self._fields(event="progress")})

    def close(self, failed: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if self._tty:
            self._draw(end="  failed\n" if failed else "\n")
        elif failed:
            log.error("%s: failed after %.1f s", self.step, self.elapsed_s,
                      extra={"fields": self._fields(event="failed")})
        else:
            log.info("%s: done in %.1f s", self.step, self.elapsed_s, extra={"fields": self._fields(event="done")})

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def _summary(self) -> str:
        unit = "" if self.unit == "bytes" else self.unit  # byte amounts carry their own unit (MiB, GiB)
        if self.total:
            return (f"{100 * self.done / self.total:3.0f}% {_amount(self.done, self.unit)}/"
                    f"{_amount(self.total, self.unit)} {unit}").rstrip()
        if self.done:
            return f"{_amount(self.done, self.unit)} {unit}".rstrip()
        return ""

    def _fields(self, event: str) -> dict[str, object]:
        fields: dict[str, object] = {"step": self.step, "event": event, "elapsed_s": round(self.elapsed_s, 3)}
        if self.total is not None or self.done:
            fields.update(done=self.done, unit=self.unit)
        if self.total is not None:
            fields["total"] = self.total
        return fields

    def _draw(self, end: str = "") -> None:
        if self.total:
            filled = round(BAR_WIDTH * min(self.done / self.total, 1.0))
            bar = "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "] "
        else:
            bar = ""
        # \x1b[K clears what a longer earlier line left on the right.
        self._stream.write(f"\r{self.step:<12} {bar}{self._summary()} {self.elapsed_s:.1f}s\x1b[K{end}")
        self._stream.flush()
