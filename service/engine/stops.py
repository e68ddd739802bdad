"""Stop-sequence matching on the released text stream, across token boundaries."""

from __future__ import annotations


class StopMatcher:
    """Holds back only text that could still begin a stop sequence; releases the rest at once."""

    def __init__(self, stops: tuple[str, ...], include: bool) -> None:
        self.stops = tuple(s for s in stops if s)
        self.include = include
        self.pending = ""

    def feed(self, delta: str, armed: bool = True) -> tuple[str, str | None]:
        """Returns (text to release now, the stop that matched or None). Unarmed (before min_new_tokens, as vLLM
        has it), the text is released at once and never searched: stops match only in text that comes later."""
        if not self.stops or not armed:
            return delta, None
        buf = self.pending + delta
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0 and (best is None or (at, -len(stop)) < (best[0], -best[1])):
                best = (at, len(stop), stop)
        if best is not None:
            at, n, stop = best
            self.pending = ""
            return buf[: at + n] if self.include else buf[:at], stop
        hold = self._held_suffix(buf)
        self.pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_suffix(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buf)), longest, -1):
                if buf.endswith(stop[:n]):
                    longest = n
                    break
        return longest
