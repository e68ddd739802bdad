"""Admission and deadline policy, in one place for every front."""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.config import Config
from service.engine.api import CallerQuotaError, EngineClient
from service.engine.types import GenerationRequest
from service.errors import DeadlineTooShortError, FieldViolation, InvalidRequestError, TargetUnattainableError

SLO_TTFT, SLO_TPOT = "x-llm-d-slo-ttft-ms", "x-llm-d-slo-tpot-ms"  # the gateway's latency targets, in ms
SLO_HEADERS = (SLO_TTFT, SLO_TPOT)


@dataclass(frozen=True)
class Targets:
    """A request's latency targets (the gateway's x-llm-d-slo-ttft-ms and x-llm-d-slo-tpot-ms), in ms."""

    ttft_ms: int | None = None
    tpot_ms: int | None = None


NO_TARGETS = Targets()


def targets(headers: dict[str, str]) -> Targets:
    """The targets from their headers; InvalidRequestError naming a header whose value is no positive integer."""
    values: dict[str, int] = {}
    bad: list[FieldViolation] = []
    for name, header in (("ttft_ms", SLO_TTFT), ("tpot_ms", SLO_TPOT)):
        text = headers.get(header)
        if text is None:
            continue
        if not text.strip().isdigit() or int(text) <= 0:
            bad.append(FieldViolation(header, f"must be a positive integer of milliseconds, not {text[:32]!r}"))
        else:
            values[name] = int(text)
    if bad:
        raise InvalidRequestError(bad)
    return Targets(**values)


def admit(engine: EngineClient, req: GenerationRequest, limit_ms: int, remaining_s: float | None,
          config: Config, goals: Targets = NO_TARGETS) -> GenerationRequest:
    """The request with its deadline set; DeadlineTooShortError when the caller would wait for nothing, and
    TargetUnattainableError when the engine's own estimates miss a latency target the request carries.

    The deadline is the earlier of the request's time limit and the caller's own deadline less a margin, so that
    the stream ends gracefully with TIME_LIMIT and the text so far before the caller gives up. The engine checks
    deadlines between steps, so the margin is at least two steps. The targets are checked against the same
    first-token estimate and the measured decode step (each stream gets one token per step).
    """
    now = time.monotonic()
    deadline = now + limit_ms / 1000.0
    wait: float | None = None
    if remaining_s is not None or goals.ttft_ms is not None:
        wait = engine.estimate_first_token_s(len(req.prompt_ids), req.caller)
    if remaining_s is not None and wait is not None:
        margin = max(config.deadline_margin_ms / 1000.0, 2 * engine.step_seconds)
        deadline = min(deadline, now + remaining_s - margin)
        if wait > remaining_s:
            raise DeadlineTooShortError(
                f"the deadline ({remaining_s * 1000:.0f} ms) is shorter than the estimated time to the first token "
                f"({wait * 1000:.0f} ms); retry with a longer deadline or later")
    if goals.ttft_ms is not None and wait is not None and wait * 1000 > goals.ttft_ms:
        raise TargetUnattainableError(
            f"{SLO_TTFT}: the estimated time to the first token here is {wait * 1000:.0f} ms, over the target "
            f"({goals.ttft_ms} ms)")
    if goals.tpot_ms is not None and engine.step_seconds * 1000 > goals.tpot_ms:
        raise TargetUnattainableError(
            f"{SLO_TPOT}: a token takes {engine.step_seconds * 1000:.0f} ms here (one decode step), over the target "
            f"({goals.tpot_ms} ms)")
    return dataclasses.replace(req, deadline=deadline)


class TokenRates:
    """Per-caller token buckets: on average `rate` generated tokens per second, `burst` at once.

    A request is refused while its caller's bucket is empty; a finished stream is charged what it generated, so a
    bucket may go below zero and the caller waits until it refills (the RetryInfo says how long).

    Only buckets below full are kept (a full one carries no information): each charge notes when its bucket will
    be full again, and buckets are forgotten at that time, so the state is bounded by the callers whose buckets
    are refilling, not by the callers ever seen.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst or 10 * rate)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at clock())
        self._full_at: list[tuple[float, str]] = []  # heap: when a charged bucket is full again

    def _level(self, caller: str, now: float) -> float:
        tokens, at = self._buckets.get(caller, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _forget_full(self, now: float) -> None:
        while self._full_at and self._full_at[0][0] <= now:
            _, caller = heapq.heappop(self._full_at)
            if caller in self._buckets and self._level(caller, now) >= self.burst:
                del self._buckets[caller]

    def check(self, caller: str) -> None:
        now = self._clock()
        self._forget_full(now)
        level = self._level(caller, now)
        if level <= 0:
            raise CallerQuotaError(caller, "tokens_per_s", f"this caller has used its {self.rate:g} tokens/s",
                                   retry_after_s=(1 - level) / self.rate)

    def charge(self, caller: str, tokens: int) -> None:
        now = self._clock()
        self._forget_full(now)
        level = self._level(caller, now) - tokens
        if level >= self.burst:
            self._buckets.pop(caller, None)
            return
        self._buckets[caller] = (level, now)
        heapq.heappush(self._full_at, (now + (self.burst - level) / self.rate, caller))
