"""What goes into the engine and what comes out of it, free of any transport."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.engine.constraints import CompiledConstraint


class Finish(enum.Enum):
    MAX_TOKENS = "max_tokens"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    TIME_LIMIT = "time_limit"
    CONTEXT_LENGTH = "context_length"
    CANCELLED = "cancelled"
    ERROR = "error"


class ErrorKind(enum.Enum):
    """Why a request failed, so the transport can pick a status code in one place."""

    INTERNAL = "internal"
    OUT_OF_MEMORY = "out_of_memory"
    OVERLOADED = "overloaded"  # displaced from a full wait queue by a caller with less than its share


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    min_new_tokens: int = 0
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    deadline: float | None = None  # time.monotonic() at which the stream ends with TIME_LIMIT
    logprobs: bool = False
    top_n: int = 0
    echo_prompt_tokens: bool = False
    request_id: str = ""
    trace_id: str = ""  # for the engine's own log lines about this request
    caller: str = ""  # who is asking: slots and queue places are shared fairly between callers; caps are per caller
    # Within `caller` (a token), the client a trusted gateway named (its fairness id): its own turn in fair sharing,
    # always within the caller's caps and rates.
    sub_caller: str = ""
    priority: int = 0  # a higher one starts before any waiting request of a lower one (fair sharing within one)
    # Structured output: the compiled constraint the generated text must satisfy (constraints.py); None for none.
    constraint: CompiledConstraint | None = None
    # Prefix reuse: only requests with the same salt (and, unless sharing is on, the same caller) share kept K/V.
    cache_salt: str = ""

    @property
    def fair_caller(self) -> str:
        """Whose turn this request takes in fair sharing: the sub-caller where there is one."""
        return f"{self.caller}/{self.sub_caller}" if self.sub_caller else self.caller


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenOut:
    id: int
    text: str
    logprob: float | None = None
    top: tuple[TopToken, ...] = ()


@dataclass(frozen=True)
class Timings:
    arrival_ns: int  # wall clock, for spans
    prefill_start_ns: int
    first_token_ns: int
    end_ns: int

    @property
    def queue_ms(self) -> float:
        return max(0, self.prefill_start_ns - self.arrival_ns) / 1e6 if self.prefill_start_ns else self.total_ms

    @property
    def ttft_ms(self) -> float:
        return (self.first_token_ns - self.arrival_ns) / 1e6 if self.first_token_ns else 0.0

    @property
    def decode_ms(self) -> float:
        return (self.end_ns - self.first_token_ns) / 1e6 if self.first_token_ns else 0.0

    @property
    def total_ms(self) -> float:
        return (self.end_ns - self.arrival_ns) / 1e6


@dataclass(frozen=True)
class Chunk:
    """One stream message: released text and the tokens it covers; `finish` is set on the last one only."""

    text: str
    tokens: tuple[TokenOut, ...] = ()
    finish: Finish | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Timings | None = None
    stop_sequence: str = ""
    seed: int | None = None
    error: str = ""
    error_kind: ErrorKind | None = None
    prompt_token_ids: tuple[int, ...] = ()
    cached_prompt_tokens: int = 0  # on the final chunk: prompt positions reused from the prefix cache
