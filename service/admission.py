"""Admission and deadline policy, in one place for every front."""

from __future__ import annotations

import dataclasses
import time

from service.config import Config
from service.engine.api import CallerQuotaError, EngineClient
from service.engine.types import GenerationRequest
from service.errors import DeadlineTooShortError


def admit(engine: EngineClient, req: GenerationRequest, limit_ms: int, remaining_s: float | None,
          config: Config) -> GenerationRequest:
    """The request with its deadline set, or DeadlineTooShortError when the caller would wait for nothing.

    The deadline is the earlier of the request's time limit and the caller's own deadline less a margin, so that
    the stream ends gracefully with TIME_LIMIT and the text so far before the caller gives up. The engine checks
    deadlines between steps, so the margin is at least two steps.
    """
    now = time.monotonic()
    deadline = now + limit_ms / 1000.0
    if remaining_s is not None:
        margin = max(config.deadline_margin_ms / 1000.0, 2 * engine.step_seconds)
        deadline = min(deadline, now + remaining_s - margin)
        wait = engine.estimate_first_token_s(len(req.prompt_ids), req.caller)
        if wait > remaining_s:
            raise DeadlineTooShortError(
                f"the deadline ({remaining_s * 1000:.0f} ms) is shorter than the estimated time to the first token "
                f"({wait * 1000:.0f} ms); retry with a longer deadline or later")
    return dataclasses.replace(req, deadline=deadline)


class TokenRates:
    """Per-caller token buckets: on average `rate` generated tokens per second, `burst` at once.

    A request is refused while its caller's bucket is empty; a finished stream is charged what it generated, so a
    bucket may go below zero and the caller waits until it refills (the RetryInfo says how long).
    """

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst or 10 * rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at time.monotonic())

    def _level(self, caller: str, now: float) -> float:
        tokens, at = self._buckets.get(caller, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def check(self, caller: str) -> None:
        level = self._level(caller, time.monotonic())
        if level <= 0:
            raise CallerQuotaError(caller, "tokens_per_s", f"this caller has used its {self.rate:g} tokens/s",
                                   retry_after_s=(1 - level) / self.rate)

    def charge(self, caller: str, tokens: int) -> None:
        now = time.monotonic()
        self._buckets[caller] = (self._level(caller, now) - tokens, now)
        if len(self._buckets) > 4096:  # full buckets carry no information: forget them
            self._buckets = {c: b for c, b in self._buckets.items() if self._level(c, now) < self.burst}
