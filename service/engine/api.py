"""What the transports see of the engine: its protocol, config, stats and errors. Imports neither paddle nor grpc,
so a front (gRPC, HTTP) and its unit tests run against any engine that keeps this protocol, a fake one included."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.engine.types import Chunk, GenerationRequest


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 32  # sequences decoded together in one step
    max_prefill_tokens: int = 256  # prompt tokens prefilled per iteration, across requests
    max_context: int = 2048  # capped at the model's own limit when it loads
    max_queue: int = 64  # waiting requests beyond the slots
    max_backlog: int = 256  # undelivered chunks per stream before it is ended as a slow consumer
    device: str = "cpu"
    dtype: str = "float32"


@dataclass(frozen=True)
class EngineStats:
    active: int  # sequences holding a slot and decoding
    prefilling: int
    waiting: int
    cache_capacity: int
    cache_bytes: int
    used_positions: int
    max_slots: int
    max_context: int
    steps: int  # decode steps run so far
    iterations: int  # scheduler iterations, idle polls included
    last_iteration_monotonic: float
    alive: bool
    # Decode steps per batch size: batch_sizes[b] is how many steps ran with b rows (index 0 unused).
    batch_sizes: tuple[int, ...] = ()

    @property
    def kv_fill_ratio(self) -> float:
        return self.used_positions / float(self.max_slots * self.max_context)


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the engine's effective limits (after capping to what the model supports)."""

    name: str
    architecture: str
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context: int
    max_slots: int
    dtype: str
    device: str
    has_chat_template: bool
    # Sampling defaults the checkpoint recommends (generation_config.json or GGUF metadata); informative only:
    # the contract says unset sampling means greedy.
    generation_defaults: dict[str, Any] = field(default_factory=dict)


class QueueFullError(RuntimeError):
    """The engine's slots and wait queue are full."""


class Tokenizing(Protocol):
    """What the fronts need of a tokenizer: validation and the Tokenize RPC."""

    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def encode_full(self, text: str) -> Any: ...


class EngineStream(Protocol):
    """One request's chunks. Leaving it early (cancel) stops the decoding at the engine's next step."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def __anext__(self) -> Chunk: ...

    def cancel(self) -> None: ...

    @property
    def marks(self) -> StreamMarks: ...


@dataclass
class StreamMarks:
    """Times the engine has reached for one stream, readable while it runs (for a cancelled stream's span)."""

    arrival_ns: int = 0
    prefill_start_ns: int = 0
    first_token_ns: int = 0
    tokens_emitted: int = 0


class EngineClient(Protocol):
    """What a transport needs of an engine: generate, stats, an admission estimate and the model's description."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def tokenizer(self) -> Tokenizing: ...

    @property
    def step_seconds(self) -> float: ...

    def generate(self, req: GenerationRequest) -> EngineStream: ...

    def stats(self) -> EngineStats: ...

    def estimate_first_token_s(self, prompt_tokens: int) -> float: ...

    def cancel_all(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def wait_until(self, predicate: Callable[[EngineStats], bool], timeout: float) -> bool: ...
