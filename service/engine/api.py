"""What the transports see of the engine: its protocol, config, stats and errors. Imports neither paddle nor grpc,
so a front (gRPC, HTTP) and its unit tests run against any engine that keeps this protocol, a fake one included."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from service.engine.types import Chunk, GenerationRequest

KERNEL_MODES = ("auto", "plain")
PREFIX_SCOPES = ("caller", "shared")  # service/engine/prefix_cache.py SCOPES
# The KV cache's block, in positions: the unit that the cache figures (usage, number of blocks) are counted in, as a
# paged cache counts them. The slot cache is not paged, but attention gathers a row's keys in blocks of this many
# positions (service/engine/attention.py KEY_BLOCK, the same number: tests/test_gateway.py checks it), so a sequence
# of n positions occupies ceil(n / KV_BLOCK) of them.
KV_BLOCK = 32
AUTO_DECODE_THREADS = 2  # the most threads decode_threads=0 picks: the most ever measured (bench/PROFILE.md)


def setting(default: Any, *, at_least: float | None = None, above: float | None = None, at_most: float | None = None,
            choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its bounds, declared beside its default: checked at start by check_bounds (a value out of
    range stops the server with the setting's name), and the choices given to the flag's parser."""
    meta = {k: v for k, v in (("at_least", at_least), ("above", above), ("at_most", at_most), ("choices", choices))
            if v is not None}
    return field(default=default, metadata=meta)


def check_bounds(config: Any) -> None:
    """ValueError naming the first setting of a config dataclass whose value is outside its declared bounds."""
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if "at_least" in meta and value < meta["at_least"]:
            raise ValueError(f"{f.name}: must be at least {meta['at_least']}, not {value!r}")
        if "above" in meta and value <= meta["above"]:
            raise ValueError(f"{f.name}: must be above {meta['above']}, not {value!r}")
        if "at_most" in meta and value > meta["at_most"]:
            raise ValueError(f"{f.name}: must be at most {meta['at_most']}, not {value!r}")
        if "choices" in meta and value not in meta["choices"]:
            raise ValueError(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}")


def default_model_cache() -> Path:
    """Where named models live unless --model-cache says otherwise."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenstream" / "models"


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = setting(32, at_least=1)  # sequences decoded together in one step
    max_prefill_tokens: int = setting(256, at_least=1)  # prompt tokens per step at most, across requests
    # While streams decode, a step may carry prompt tokens worth this many decode steps of extra time (measured):
    # new prompts start soon, and running streams never freeze for a whole long prompt.
    prefill_stall_steps: float = setting(1.5, above=0)
    max_context: int = setting(2048, at_least=2)  # capped at the model's own limit when it loads
    max_queue: int = setting(64, at_least=0)  # waiting requests beyond the slots
    max_backlog: int = setting(256, at_least=1)  # undelivered chunks per stream before it is ended as a slow consumer
    # A stream whose reader has taken no message for this long while messages wait is ended ("the client
    # stopped reading"), and its slot freed: a write blocked on a full HTTP/2 window counts, however few wait.
    slow_reader_s: float = setting(5.0, above=0)
    caller_max_streams: int = setting(0, at_least=0)  # per caller, running or queued (0: no cap)
    caller_max_queued: int = setting(0, at_least=0)  # per caller, queued (0: no cap)
    device: str = "cpu"
    dtype: str = "float32"
    # Optional fused kernels (RMSNorm, SwiGLU): "auto" uses each where a child-process probe proved it on this CPU
    # (service/engine/kernels.py); "plain" never calls them. Either way the one-forward step runs.
    kernels: str = setting("auto", choices=KERNEL_MODES)
    # MKL/OpenMP threads in the decoder's ops. 0: one per CPU this process may use, at most AUTO_DECODE_THREADS (two
    # threads on two cores: 1.26x / 1.6x / 1.5x tokens/s served at 1 / 8 / 32 streams, bench/PROFILE.md "Two cores";
    # more were never measured).
    decode_threads: int = setting(0, at_least=0)
    # Prefix reuse (service/engine/prefix_cache.py): K/V of ended or preempted sequences kept on the host, up to this
    # many MiB (SmolLM2: 46,080 bytes a position, so 1 GiB holds ~23,000), in blocks of KV_BLOCK positions; 0: off.
    prefix_cache_mb: int = setting(1024, at_least=0)
    # Whose kept prefixes a request may reuse: its own caller's ("caller"), or every caller's ("shared"). A request's
    # cache_salt separates further either way.
    prefix_cache_scope: str = setting("caller", choices=PREFIX_SCOPES)

    def __post_init__(self) -> None:
        check_bounds(self)

    @property
    def threads(self) -> int:
        """decode_threads with 0 resolved: the CPUs this process may run on, at most AUTO_DECODE_THREADS."""
        return self.decode_threads or min(len(os.sched_getaffinity(0)), AUTO_DECODE_THREADS)


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
    preemptions: int = 0  # sequences sent back to the queue so that another caller could have a slot
    displaced: int = 0  # queued requests refused later, to make room for a caller below its share
    slow_readers: int = 0  # streams ended because their reader stopped taking messages
    used_blocks: int = 0  # KV_BLOCK-position blocks the sequences holding a slot have written into
    prefix_queries: int = 0  # prompts looked up in the prefix cache
    prefix_hits: int = 0  # lookups that found at least one block
    prefix_reused_tokens: int = 0  # prompt positions copied from the prefix cache instead of prefilled
    prefix_cache_bytes: int = 0  # held by the prefix cache now

    @property
    def kv_fill_ratio(self) -> float:
        return self.used_positions / float(self.max_slots * self.max_context)

    @property
    def running(self) -> int:
        """Requests being served (the Model Server Protocol's TotalRunningRequests): decoding or being prefilled."""
        return self.active + self.prefilling

    @property
    def kv_blocks(self) -> int:
        """Blocks the cache holds at its maximum: every slot at the full context (not what is allocated now)."""
        return self.max_slots * -(-self.max_context // KV_BLOCK)

    @property
    def kv_usage(self) -> float:
        """The fraction of kv_blocks in use, 0 to 1 (the protocol's KVCacheUtilization; vLLM's kv_cache_usage_perc
        is this fraction too, despite its name)."""
        return self.used_blocks / float(self.kv_blocks)


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
    # Prefix reuse: the budget in bytes (0: off), its block in positions, and whose prefixes are shared.
    prefix_cache_bytes: int = 0
    prefix_cache_block: int = KV_BLOCK
    prefix_cache_scope: str = "caller"


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template failed to render the messages."""


class EngineStoppedError(RuntimeError):
    """A submission after the engine loop ended (stopped, or its thread died): nothing would ever run it."""


class QueueFullError(RuntimeError):
    """The engine's slots and wait queue are full (and the caller already has its share of them)."""


class CallerQuotaError(QueueFullError):
    """One caller's own cap on streams or queued requests (or its token rate) is reached."""

    def __init__(self, caller: str, limit: str, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.caller = caller
        self.limit = limit  # which cap: "streams", "queued" or "tokens_per_s"
        self.retry_after_s = retry_after_s


class Tokenizing(Protocol):
    """What the fronts need of a tokenizer: validation and the Tokenize RPC."""

    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def encode_full(self, text: str) -> Any: ...

    def token_bytes(self, token_id: int) -> bytes | None: ...


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

    def estimate_first_token_s(self, prompt_tokens: int, caller: str = "") -> float: ...

    def cancel_all(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def wait_until(self, predicate: Callable[[EngineStats], bool], timeout: float) -> bool: ...
