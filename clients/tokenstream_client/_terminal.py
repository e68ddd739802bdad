"""What the CLI's commands share for output: exit statuses, the live status line, error reports, JSON lines."""

from __future__ import annotations

import json
import threading
import time
from typing import Self, TextIO

from tokenstream_client.errors import TokenstreamError
from tokenstream_client.messages import Delta, FinishReason

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STREAM_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
CLEAR_LINE = "\r\x1b[K"


class StatusLine:
    """TTFT and tokens/s on stderr, redrawn in place with carriage returns.

    When stdout is the same terminal, the line is only drawn while waiting for the first token (it would otherwise
    overwrite the streamed text) and once more, on a line of its own, at the end. When stdout goes elsewhere it is
    redrawn for every delta.
    """

    def __init__(self, err: TextIO, *, shares_terminal: bool, interval_s: float = 0.1) -> None:
        self.err = err
        self.shares_terminal = shares_terminal
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self._drawn = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="tokenstream-status", daemon=True)

    def __enter__(self) -> Self:
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            self._clear()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self.first is None or not self.shares_terminal:
                    self._draw()

    def _draw(self) -> None:
        self.err.write(CLEAR_LINE + self.render())
        self.err.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.err.write(CLEAR_LINE)
            self.err.flush()
            self._drawn = False

    def on_delta(self, delta: Delta) -> None:
        """Call before writing the delta's text to stdout."""
        now = time.monotonic()
        with self._lock:
            if delta.tokens:
                if self.first is None:
                    self.first = now
                    if self.shares_terminal:
                        self._clear()
                self.last = now
                self.tokens += len(delta.tokens)
            if not self.shares_terminal:
                self._draw()

    def rate(self) -> float | None:
        """Decode rate in tokens/s, from the first token to the last."""
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    def render(self, final: Delta | None = None, *, ended: str | None = None) -> str:
        """While streaming: what has arrived so far. At the end (`final`, or why it `ended` without one): led by
        the finish reason."""
        if final is not None and final.finish_reason is not None:
            ended = final.finish_reason.value
        if self.first is None:
            waited = time.monotonic() - self.start
            if final is None and ended is None:
                return f"waiting for the first token… {waited:.1f} s"
            return " · ".join(filter(None, [ended, "no tokens"]))
        parts = [f"TTFT {1000.0 * (self.first - self.start):.0f} ms", f"{self.tokens} tokens"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        return " · ".join([ended, *parts] if ended else parts)

    def summary(self, final: Delta | None, *, ended: str | None = None) -> None:
        self.stop()
        self.err.write(self.render(final, ended=ended) + "\n")
        self.err.flush()


def report_error(error: TokenstreamError, json_output: bool, out: TextIO, err: TextIO) -> int:
    """The gRPC status name, message and field violations on stderr (and as a JSON line on stdout with --json)."""
    if json_output:
        out.write(json.dumps({"error": error.to_dict()}, ensure_ascii=False) + "\n")
        out.flush()
    err.write(f"error: {error.describe()}\n")
    if error.request_id:
        err.write(f"  (request id {error.request_id}, {error.attempts} attempt{'s' * (error.attempts != 1)})\n")
    err.flush()
    return EXIT_ERROR


def delta_line(delta: Delta, request_id: str) -> str:
    """One streamed message as a JSON line; the final one also names the request."""
    record = delta.to_dict()
    if delta.is_final:
        record["request_id"] = request_id
    return json.dumps(record, ensure_ascii=False) + "\n"


def report_failed_stream(final: Delta | None, request_id: str, err: TextIO) -> int:
    """EXIT_STREAM_FAILED, said on stderr, for a stream that ended with finish reason ERROR or CANCELLED."""
    reason = final.finish_reason if final is not None else None
    if final is None or reason is None or reason not in (FinishReason.ERROR, FinishReason.CANCELLED):
        return EXIT_OK
    detail = f": {final.error_message}" if final.error_message else ""
    err.write(f"error: the stream ended with {reason.value}{detail} (request id {request_id})\n")
    err.flush()
    return EXIT_STREAM_FAILED
