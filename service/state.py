"""What the fronts know about the engine's life: loading, serving, draining."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from service.admission import TokenRates
from service.config import Config
from service.engine.api import EngineClient
from service.errors import NotReadyError, ShuttingDownError


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

    def __post_init__(self) -> None:
        if self.config.caller_tokens_per_s > 0:
            self.rates = TokenRates(self.config.caller_tokens_per_s, self.config.caller_token_burst)

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.engine is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.engine

    def stream_started(self) -> None:
        self.active_streams += 1

    def stream_ended(self) -> None:
        self.active_streams -= 1
        if self.draining and self.active_streams == 0:
            self.drained.set()
