"""When a failed call may be tried again, and after how long.

Only two failures are retried, because only for them is a second attempt known to be safe:

- RESOURCE_EXHAUSTED carrying google.rpc.RetryInfo (the server's queue was full, or it ran out of memory before the
  first token): the server asks to be retried, and after how long; that delay is honoured, plus jitter.
- UNAVAILABLE (loading, draining, unreachable, a dead engine) before any message of the call was received:
  exponential backoff with jitter. A draining server refuses the requests it has queued but not started with this
  UNAVAILABLE, so during a rolling deploy they are retried, on another replica where the channel balances.

Nothing is retried once a response message has been received: the caller has seen tokens, and a second attempt
would produce different ones. Attempts are bounded, and no retry starts that would end after the call's deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from tokenstream_client.errors import TokenstreamError

_RANDOM = random.Random()


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # attempts in all, the first included; 1 turns retries off
    initial_backoff_s: float = 0.1  # UNAVAILABLE: the first backoff, before jitter
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.2  # backoff is scaled by a random factor in [1 - jitter, 1 + jitter]
    max_retry_delay_s: float = 30.0  # a RetryInfo delay above this is not waited for: the error is raised

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("jitter must be in [0, 1)")

    @classmethod
    def disabled(cls) -> RetryPolicy:
        return cls(max_attempts=1)

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based), with jitter."""
        rng = rng or _RANDOM
        base = min(self.max_backoff_s, self.initial_backoff_s * self.backoff_multiplier ** (attempt - 1))
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def delay_for(
        self, error: TokenstreamError, attempt: int, *, received_response: bool, rng: random.Random | None = None
    ) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when `error` must be raised instead."""
        if attempt >= self.max_attempts or received_response:
            return None
        rng = rng or _RANDOM
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay is not None:
            if error.retry_delay > self.max_retry_delay_s:
                return None
            # Never earlier than the server asked; jitter only adds, so that clients told alike spread out.
            return error.retry_delay * (1.0 + rng.uniform(0.0, self.jitter))
        if error.code == grpc.StatusCode.UNAVAILABLE:
            return self.backoff(attempt, rng)
        return None


DEFAULT_RETRY = RetryPolicy()
