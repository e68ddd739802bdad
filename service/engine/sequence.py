"""One request's decoding state, and the per-token decisions made on it.

Everything here is a function of the sequence's own state and its inputs (the token, its logprobs, the time):
no Paddle, no scheduler, no threads. The scheduler feeds tokens in and delivers the chunks that come out.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np

from service.engine.stops import StopMatcher
from service.engine.tokenizer import IncrementalDetokenizer
from service.engine.types import Chunk, ErrorKind, Finish, GenerationRequest, Timings, TokenOut, TopToken

SLOW_READER = "the client stopped reading"


class ConstraintViolationError(RuntimeError):
    """A token the sequence's constraint does not allow (its mask was not applied): the stream ends in error."""


class SequenceState:
    """Engine-thread state of one request."""

    def __init__(self, req: GenerationRequest, tokenizer: Any, eos_ids: tuple[int, ...], max_context: int,
                 arrival_ns: int, handle: Any = None) -> None:
        self.req = req
        self.handle = handle  # the delivery side (delivery.StreamHandle); opaque here
        self.prompt = np.asarray(req.prompt_ids, dtype=np.int64)
        self.context = self.prompt  # what the current prefill puts in the cache (context_ids())
        self.max_context = max_context
        self.prefilled = 0
        self.slot = -1
        self.cached_tokens = -1  # prompt positions reused from the prefix cache at its first start (-1: not started)
        self.restore: Any = None  # a prefix cache hit to copy into the slot before the next step (scheduler)
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(req.stop_sequences, req.include_stop_sequence)
        self._decode: Callable[[list[int]], str] = tokenizer.decode
        sampling = req.sampling
        # An unseeded sampled request draws a seed and reports it, so any stream can be replayed.
        drawn = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.seed = None if sampling.greedy else drawn
        self.rng = np.random.Generator(np.random.PCG64(self.seed)) if self.seed is not None else None
        self.pending: list[TokenOut] = []  # tokens whose text is not released yet
        self.arrival_ns = arrival_ns
        self.prefill_start_ns = 0
        self.first_token_ns = 0
        self.first_chunk_sent = False
        self.finished = False
        self.eos = frozenset(eos_ids)
        # Structured output: this sequence's own matcher, advanced by every accepted token (and kept across a
        # preemption: the sequence keeps its tokens, so the matcher stays in step with them).
        self.matcher = req.constraint.start() if req.constraint is not None else None
        self.needs_logits = (
            not sampling.greedy or sampling.repetition_penalty != 1.0 or req.logprobs or req.top_n > 0
            or (req.min_new_tokens > 0 and bool(eos_ids)) or self.matcher is not None
        )

    @property
    def cache_len(self) -> int:
        """Positions written to this slot's cache (the newest sampled token is not written yet)."""
        return len(self.prompt) + len(self.generated) - 1 if self.generated else self.prefilled

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def context_ids(self) -> np.ndarray:
        """What a prefill must put in the cache: the prompt, and after a preemption the tokens generated since
        (but the newest, which the next decode step writes)."""
        if not self.generated:
            return self.prompt
        return np.concatenate([self.prompt, np.asarray(self.generated[:-1], dtype=np.int64)])

    @property
    def banned(self) -> tuple[int, ...]:
        """Token ids that may not be sampled now: EOS before min_new_tokens."""
        return tuple(self.eos) if len(self.generated) < self.req.min_new_tokens else ()

    def accept(self, token: int, now_ns: int, logprob: float | None = None,
               top: tuple[TopToken, ...] = ()) -> Chunk | None:
        """Take the next token. Returns the chunk to send now, if any: released text, or the final message.

        Precedence when several endings coincide: EOS, then a stop sequence, then max_new_tokens, then the context.
        Before min_new_tokens, EOS is banned (see banned) and stop sequences are not matched.
        """
        self.generated.append(token)
        if self.first_token_ns == 0:
            self.first_token_ns = now_ns
        self.pending.append(TokenOut(token, self._decode([token]), logprob, top))
        n = len(self.generated)
        if token in self.eos:
            return self.finish(Finish.EOS_TOKEN, now_ns)  # the EOS id is reported in tokens, never as text
        if self.matcher is not None and not self.matcher.consume_token(token):
            raise ConstraintViolationError(f"token {token} is outside the constraint: {self.matcher.get_error()}")
        # Before min_new_tokens, stop sequences are not looked for (vLLM's min_tokens): that text is released.
        released, stop = self.stops.feed(self.detok.add(token), armed=n >= self.req.min_new_tokens)
        if stop is not None:
            return self.finish(Finish.STOP_SEQUENCE, now_ns, text=released, stop=stop)
        if n >= self.req.max_new_tokens:
            return self.finish(Finish.MAX_TOKENS, now_ns, text=released)
        if len(self.prompt) + n >= self.max_context:
            return self.finish(Finish.CONTEXT_LENGTH, now_ns, text=released)
        if not released:
            return None
        chunk = Chunk(released, tuple(self.pending), prompt_token_ids=self._echo())
        self.pending = []
        return chunk

    def finish(self, reason: Finish, now_ns: int, error: str = "", error_kind: ErrorKind | None = None,
               text: str = "", stop: str = "") -> Chunk:
        """The final message: held text released (unless the ending discards it), usage and timings."""
        assert not self.finished, "a sequence finishes once"
        self.finished = True
        if reason is not Finish.STOP_SEQUENCE and reason is not Finish.ERROR:
            armed = len(self.generated) >= self.req.min_new_tokens
            tail, matched = self.stops.feed(self.detok.flush(), armed)  # held bytes, as the full decode shows them
            text += tail
            if matched is not None:
                reason, stop = Finish.STOP_SEQUENCE, matched
            else:
                text += self.stops.flush()  # held text that turned out not to be a stop
        timings = Timings(self.arrival_ns, self.prefill_start_ns, self.first_token_ns, now_ns)
        chunk = Chunk(
            text, tuple(self.pending), finish=reason, prompt_tokens=len(self.prompt),
            completion_tokens=len(self.generated), timings=timings, stop_sequence=stop, seed=self.seed,
            error=error or ("internal error" if reason is Finish.ERROR else ""),
            error_kind=error_kind or (ErrorKind.INTERNAL if reason is Finish.ERROR else None),
            prompt_token_ids=self._echo(), cached_prompt_tokens=max(self.cached_tokens, 0),
        )
        self.pending = []
        return chunk

    def _echo(self) -> tuple[int, ...]:
        """The prompt's ids on the first chunk, when the request asked for them."""
        if self.first_chunk_sent:
            return ()
        self.first_chunk_sent = True
        return tuple(self.req.prompt_ids) if self.req.echo_prompt_tokens else ()


def verdict(seq: SequenceState, now_monotonic: float, max_backlog: int,
            slow_reader_s: float) -> tuple[Finish, str] | None:
    """Why a sequence must end before its next step, if it must: cancelled, past its deadline, or unread.

    Computed once per sequence and step: the consumer moves `consumed` concurrently, so asking twice can disagree.
    """
    handle = seq.handle
    if handle.cancelled:
        return Finish.CANCELLED, ""
    if seq.req.deadline is not None and now_monotonic >= seq.req.deadline:
        return Finish.TIME_LIMIT, ""
    if not handle.paced:
        return None
    unread = handle.emitted - handle.consumed
    if unread > max_backlog:
        return Finish.ERROR, f"{SLOW_READER}: stream buffer limit reached"
    if unread > 0 and not handle.reading and now_monotonic - handle.last_read > slow_reader_s:
        return Finish.ERROR, f"{SLOW_READER}: no message taken for {slow_reader_s:g} s"
    return None
