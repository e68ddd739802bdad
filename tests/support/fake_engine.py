"""An EngineClient without Paddle, for fast transport unit tests: the fronts cannot tell it from the real engine.

Each request's stream is scripted by the test (`script`), or by default echoes the prompt's tokens back one chunk
per token. The real tokenizer of the test model does the validation's encoding, so requests are validated as in
production. It only makes the transport's own cases (status mapping, cancellation, admission, drain) fast and
exact; each is also tested against the real engine (tests/test_transport.py's docstring says where).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from service.engine.api import EngineConfig, EngineStats, ModelInfo, StreamMarks
from service.engine.tokenizer import Tokenizer
from service.engine.types import Chunk, Finish, GenerationRequest, Timings, TokenOut

Script = Callable[[GenerationRequest], list[Chunk | BaseException]]


@dataclass
class FakeStream:
    """Plays a script; raising an exception item ends the stream with it. Waits on `release` before each item
    when the test holds the stream."""

    items: list[Chunk | BaseException]
    release: asyncio.Event | None = None
    on_cancel: Callable[[], None] = lambda: None
    cancelled: bool = False
    marks: StreamMarks = field(default_factory=StreamMarks)

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if not self.items or self.cancelled:
            raise StopAsyncIteration
        if self.release is not None:
            await self.release.wait()
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        self.marks.tokens_emitted += len(item.tokens)
        return item

    def cancel(self) -> None:
        self.cancelled = True
        self.on_cancel()


def echo(tokenizer: Tokenizer) -> Script:
    """The default script: each prompt token back as one chunk, then a MAX_TOKENS final chunk."""

    def play(req: GenerationRequest) -> list[Chunk | BaseException]:
        ids = list(req.prompt_ids)[: req.max_new_tokens]
        now = time.time_ns()
        out: list[Chunk | BaseException] = [Chunk(tokenizer.decode([i]), (TokenOut(i, tokenizer.decode([i])),))
                                            for i in ids]
        out.append(Chunk("", finish=Finish.MAX_TOKENS, prompt_tokens=len(req.prompt_ids), completion_tokens=len(ids),
                         timings=Timings(now, now, now, now)))
        return out

    return play


class FakeEngine:
    def __init__(self, tokenizer: Tokenizer, script: Script | None = None, config: EngineConfig | None = None,
                 first_token_s: float = 0.0) -> None:
        cfg = config or EngineConfig(max_slots=4, max_context=512)
        self.tokenizer = tokenizer
        self.script = script or echo(tokenizer)
        self.first_token_s = first_token_s  # what the admission estimate says
        self.streams: list[FakeStream] = []
        self.requests: list[GenerationRequest] = []
        self.hold: asyncio.Event | None = None  # set by a test to hold every new stream until it is set
        self.cancelled_all = False
        self._changed = threading.Condition()
        self.info = ModelInfo(name="fake", architecture="LlamaForCausalLM", vocab_size=tokenizer.vocab_size,
                              eos_token_ids=(), max_context=cfg.max_context, max_slots=cfg.max_slots,
                              dtype="float32", device="cpu", has_chat_template=bool(tokenizer.chat_template),
                              generation_defaults={"do_sample": True, "temperature": 0.6, "top_p": 0.9})

    @property
    def step_seconds(self) -> float:
        return 0.0

    def generate(self, req: GenerationRequest) -> FakeStream:
        items = self.script(req)  # a script may raise (e.g. QueueFullError), as submit does
        self.requests.append(req)
        stream = FakeStream(items, self.hold, self._changed_now)
        # The fake has no queue: a stream starts at once (a drain lets it finish, or cancels it with a final message,
        # where a real engine's never-started request is refused with UNAVAILABLE).
        stream.marks.prefill_start_ns = time.time_ns()
        self.streams.append(stream)
        self._changed_now()
        return stream

    def _changed_now(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> bool:
        """Block the test until predicate() holds after a stream was made or cancelled."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def stats(self) -> EngineStats:
        active = sum(1 for s in self.streams if s.items and not s.cancelled)
        return EngineStats(active=active, prefilling=0, waiting=0, cache_capacity=0, cache_bytes=0,
                           used_positions=0, max_slots=self.info.max_slots, max_context=self.info.max_context,
                           steps=0, iterations=0, last_iteration_monotonic=time.monotonic(), alive=True)

    def estimate_first_token_s(self, prompt_tokens: int, caller: str = "") -> float:
        return self.first_token_s

    def cancel_all(self) -> None:
        self.cancelled_all = True
        for stream in self.streams:
            stream.items = [Chunk("", finish=Finish.CANCELLED, timings=Timings(1, 1, 1, 1))] if stream.items else []
        if self.hold is not None:
            self.hold.set()

    def wait_until(self, predicate: Callable[[EngineStats], bool], timeout: float) -> bool:
        return predicate(self.stats())

    def stop(self, timeout: float = 10.0) -> None:
        pass
