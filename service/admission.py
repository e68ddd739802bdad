"""Admission and deadline policy, in one place for every front."""

from __future__ import annotations

import dataclasses
import time

from service.config import Config
from service.engine.api import EngineClient
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
        wait = engine.estimate_first_token_s(len(req.prompt_ids))
        if wait > remaining_s:
            raise DeadlineTooShortError(
                f"the deadline ({remaining_s * 1000:.0f} ms) is shorter than the estimated time to the first token "
                f"({wait * 1000:.0f} ms); retry with a longer deadline or later")
    return dataclasses.replace(req, deadline=deadline)
