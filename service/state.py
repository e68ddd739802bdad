"""What the fronts know about the engine's life: loading, serving, draining."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.admission import TokenRates
from service.config import Config
from service.engine.api import EngineClient
from service.errors import NotReadyError, ShuttingDownError


class Refusable(Protocol):
    def refuse_if_unstarted(self) -> None:
        """At drain: end the request with UNAVAILABLE if the engine has not started it (nothing was sent)."""


@dataclass
class ServerState:
    """The engine (once loaded), drain state and per-caller rates, shared by both fronts."""

    config: Config
    auth_on: bool = False  # bearer tokens are required (then they identify callers)
    engine: EngineClient | None = None
    draining: bool = False
    active_streams: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    rates: TokenRates | None = None  # per-caller token rates, when configured
    # Requests handed to the engine that have sent nothing yet: at drain, those not started are refused.
    unsent: set[Refusable] = field(default_factory=set)
    # Test seam (None in production): called on the tokenizing worker with the request's parameters.
    tokenizing_hook: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if self.config.caller_tokens_per_s > 0:
            self.rates = TokenRates(self.config.caller_tokens_per_s, self.config.caller_token_burst)

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.engine is None:
            raise NotReadyError("the model is still loading; retry shortly")
        if not self.engine.stats().alive:
            raise NotReadyError("the engine has stopped; retry on another instance")
        return self.engine

    def refuse_unstarted(self) -> None:
        """Drain: every request the engine has not started is refused now (UNAVAILABLE: retried elsewhere)."""
        for request in list(self.unsent):
            request.refuse_if_unstarted()

    def stream_started(self) -> None:
        self.active_streams += 1

    def stream_ended(self) -> None:
        self.active_streams -= 1
        if self.draining and self.active_streams == 0:
            self.drained.set()
