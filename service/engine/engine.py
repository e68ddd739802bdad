"""The engine thread: continuous batching over a slot KV cache.

One thread owns the model. Requests arrive through a thread-safe inbox; each loop iteration
  1. admits new requests and ends cancelled or expired ones, freeing their slots at once;
  2. prefills waiting prompts, at most `max_prefill_tokens` per iteration (long prompts in chunks), so a
     new prompt delays running streams by one bounded chunk;
  3. runs one batched decode step over every active slot;
  4. hands each stream its chunks, one `call_soon_threadsafe` per event loop per iteration.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from service.engine.kv_cache import SlotKVCache
from service.engine.loader import LoadedModel
from service.engine.model import LlamaDecoder
from service.engine.sampling import apply_penalties, log_softmax, sample_row, top_alternatives
from service.engine.stops import StopMatcher
from service.engine.tokenizer import IncrementalDetokenizer
from service.engine.types import Chunk, ErrorKind, Finish, GenerationRequest, Timings, TokenOut, TopToken

log = logging.getLogger("tokenstream.engine")


@dataclass(frozen=True)
class EngineConfig:
    max_slots: int = 32
    max_prefill_tokens: int = 256  # prompt tokens prefilled per iteration, across requests
    max_context: int = 2048
    max_queue: int = 64  # waiting requests beyond the slots
    max_backlog: int = 256  # undelivered chunks per stream before it is ended as a slow consumer
    device: str = "cpu"
    dtype: str = "float32"
    debug_faults: bool = False  # honour GenerationRequest.debug_fault; off in production


@dataclass(frozen=True)
class EngineStats:
    active: int
    prefilling: int
    waiting: int
    cache_capacity: int
    cache_bytes: int
    used_positions: int
    max_slots: int
    max_context: int
    steps: int
    last_step_monotonic: float
    alive: bool

    @property
    def kv_fill_ratio(self) -> float:
        return self.used_positions / float(self.max_slots * self.max_context)


class QueueFullError(RuntimeError):
    """The engine's slots and wait queue are full."""


class StreamHandle:
    """Shared by the engine thread and one consumer. Each side writes only its own fields."""

    def __init__(self, deliver: Callable[[list[Chunk]], None], loop: asyncio.AbstractEventLoop | None) -> None:
        self.deliver = deliver
        self.loop = loop
        self.cancelled = False  # set by the consumer; the engine stops the sequence at its next step
        self.emitted = 0  # engine side
        self.consumed = 0  # consumer side

    def cancel(self) -> None:
        self.cancelled = True


class _Sequence:
    """Engine-thread state of one request."""

    def __init__(self, req: GenerationRequest, handle: StreamHandle, arrival_ns: int, model: LoadedModel) -> None:
        self.req = req
        self.handle = handle
        self.prompt = np.asarray(req.prompt_ids, dtype=np.int64)
        self.prefilled = 0
        self.slot = -1
        self.generated: list[int] = []
        self.detok = IncrementalDetokenizer(model.tokenizer)
        self.stops = StopMatcher(req.stop_sequences, req.include_stop_sequence)
        sampling = req.sampling
        # An unseeded sampled request draws a seed and reports it, so any stream can be replayed.
        drawn = sampling.seed if sampling.seed is not None else random.getrandbits(63)
        self.seed = None if sampling.greedy else drawn
        self.rng = np.random.Generator(np.random.PCG64(self.seed)) if self.seed is not None else None
        self.pending: list[TokenOut] = []
        self.arrival_ns = arrival_ns
        self.prefill_start_ns = 0
        self.first_token_ns = 0
        self.first_chunk_sent = False
        self.finished = False
        eos = model.config.eos_token_ids
        self.eos = frozenset(eos)
        self.needs_logits = (
            not sampling.greedy or sampling.repetition_penalty != 1.0 or req.logprobs or req.top_n > 0
            or (req.min_new_tokens > 0 and bool(eos))
        )

    @property
    def cache_len(self) -> int:
        """Positions written to this slot's cache (the newest sampled token is not written yet)."""
        return len(self.prompt) + len(self.generated) - 1 if self.generated else self.prefilled

    @property
    def last_token(self) -> int:
        return self.generated[-1]


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        paddle.set_device(config.device)
        self.decoder = LlamaDecoder(model.config, model.weights, config.max_context, config.dtype)
        self.cache = SlotKVCache(
            model.config.num_layers, config.max_slots, model.config.num_kv_heads, model.config.head_dim,
            config.max_context, config.dtype,
        )
        self._inbox: queue.SimpleQueue[_Sequence | None] = queue.SimpleQueue()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []  # decode rows; index == slot
        self._prefilling: _Sequence | None = None  # partly prefilled, at slot len(_active)
        self._outbox: list[tuple[StreamHandle, Chunk]] = []
        self._done: list[_Sequence] = []  # finished in this step, slots not yet freed
        self._admitted = 0
        self._steps = 0
        self._last_step = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cancel_all = False
        self._stepped = threading.Condition()
        self._prefill_s_per_token = 0.0  # moving averages, for deadline-aware admission
        self._step_s = 0.0
        self._decode_token = model.tokenizer.decode

    # -- lifecycle (any thread) ------------------------------------------------------------------

    def start(self, warmup: bool = True) -> None:
        if warmup:
            self._warmup()
        self._thread = threading.Thread(target=self._run, name="tokenstream-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_until(self, predicate: Callable[[EngineStats], bool], timeout: float) -> bool:
        """Block until predicate(stats) holds after some engine iteration, or timeout; returns whether it held."""
        deadline = time.monotonic() + timeout
        with self._stepped:
            while not predicate(self.stats()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._stepped.wait(left)
        return True

    @property
    def step_seconds(self) -> float:
        """Moving average of a decode step's duration (0 before the first step)."""
        return self._step_s

    def estimate_first_token_s(self, prompt_tokens: int) -> float:
        """A rough wait until this prompt's first token: queueing for a slot, then its prefill and one step.

        When every slot is taken, the request needs the k-th slot to free, k being its place in the queue; a
        slot frees at the latest when its sequence reaches max_new_tokens or its deadline.
        """
        now = time.monotonic()
        active = list(self._active)
        queued = len(self._waiting) + self._inbox.qsize() + (self._prefilling is not None)
        ahead = queued + len(active) - self.config.max_slots + 1
        queue_s = 0.0
        if ahead > 0 and active:
            left = sorted(
                min((s.req.max_new_tokens - len(s.generated)) * self._step_s,
                    (s.req.deadline - now) if s.req.deadline is not None else float("inf"))
                for s in active
            )
            queue_s = max(0.0, left[min(ahead, len(left)) - 1])
        return queue_s + prompt_tokens * self._prefill_s_per_token + self._step_s

    def cancel_all(self) -> None:
        """End every stream at the next step with a final CANCELLED message (shutdown after the grace period)."""
        self._cancel_all = True
        self._inbox.put(None)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        active = list(self._active)
        prefilling = self._prefilling
        used = sum(s.cache_len for s in active) + (prefilling.prefilled if prefilling else 0)
        return EngineStats(
            active=len(active), prefilling=int(prefilling is not None),
            waiting=len(self._waiting) + self._inbox.qsize(),
            cache_capacity=self.cache.capacity, cache_bytes=self.cache.nbytes, used_positions=used,
            max_slots=self.config.max_slots, max_context=self.config.max_context, steps=self._steps,
            last_step_monotonic=self._last_step, alive=self.alive,
        )

    # -- submission (any thread) -----------------------------------------------------------------

    def submit(
        self, req: GenerationRequest, deliver: Callable[[list[Chunk]], None],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> StreamHandle:
        """Queue a request. `deliver` gets the stream's chunks: on `loop` when given, else on the engine thread."""
        stats = self.stats()
        if stats.waiting + stats.prefilling + stats.active >= self.config.max_slots + self.config.max_queue:
            raise QueueFullError("all slots and the wait queue are full")
        handle = StreamHandle(deliver, loop)
        self._inbox.put(_Sequence(req, handle, time.time_ns(), self.model))
        return handle

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk]:
        """The transport's view of the engine: an async iterator of chunks; closing it cancels the request."""
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Chunk] = asyncio.Queue()
        handle = self.submit(req, lambda batch: _put_all(chunks.put_nowait, batch), loop)
        try:
            while True:
                chunk = await chunks.get()
                handle.consumed += 1
                yield chunk
                if chunk.finish is not None:
                    return
        finally:
            handle.cancel()  # a no-op when finished; stops the decoding at the next step otherwise

    def generate_sync(self, req: GenerationRequest) -> Iterator[Chunk]:
        """The same, for threads without an event loop (tests, benchmarks)."""
        out: queue.SimpleQueue[Chunk] = queue.SimpleQueue()
        handle = self.submit(req, lambda batch: _put_all(out.put, batch))
        try:
            while True:
                chunk = out.get()
                handle.consumed += 1
                yield chunk
                if chunk.finish is not None:
                    return
        finally:
            handle.cancel()

    # -- the loop (engine thread) ----------------------------------------------------------------

    def _run(self) -> None:
        paddle.set_device(self.config.device)
        with paddle.no_grad():
            while not self._stopping:
                try:
                    self._iteration()
                except Exception as exc:  # a failed batch must not kill the engine
                    log.exception("engine iteration failed")
                    self._fail_all(exc)
                self._publish()
                with self._stepped:
                    self._stepped.notify_all()
        self._fail_all(RuntimeError("engine stopped"), Finish.CANCELLED)
        self._publish()

    def _iteration(self) -> None:
        self._admit(block=not (self._active or self._waiting or self._prefilling))
        if self.config.debug_faults:
            self._debug_stall()
        self._reap()
        self._prefill()
        self._publish()  # first tokens go out now, not after the decode step below
        if self._active:
            self._decode()
        self._steps += 1
        self._last_step = time.monotonic()

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._waiting.append(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _reap(self) -> None:
        """End cancelled, expired and stalled sequences wherever they are, freeing their slots now."""
        now = time.monotonic()
        if self._cancel_all:
            for seq in [*self._waiting, *self._active, *([self._prefilling] if self._prefilling else [])]:
                seq.handle.cancel()

        def verdict(seq: _Sequence) -> tuple[Finish, str] | None:
            if seq.handle.cancelled:
                return Finish.CANCELLED, ""
            if seq.req.deadline is not None and now >= seq.req.deadline:
                return Finish.TIME_LIMIT, ""
            if seq.handle.emitted - seq.handle.consumed > self.config.max_backlog:
                return Finish.ERROR, "the client stopped reading: stream buffer limit reached"
            return None

        for seq in [s for s in self._waiting if verdict(s)]:
            self._waiting.remove(seq)
            self._finish(seq, *verdict(seq))  # type: ignore[misc]
        for seq in [s for s in [*self._active, self._prefilling] if s is not None and verdict(s)]:
            self._finish(seq, *verdict(seq))  # type: ignore[misc]
        self._release_done()

    def _ensure_capacity(self, extra_for: _Sequence | None = None, extra: int = 0) -> None:
        longest = max((s.cache_len + 1 for s in self._active), default=1)
        if self._prefilling is not None:
            longest = max(longest, self._prefilling.prefilled + (extra if extra_for is self._prefilling else 0))
        used = len(self._active) + (self._prefilling is not None)
        self.cache.ensure(min(longest, self.config.max_context), used)

    def _prefill(self) -> None:
        budget = self.config.max_prefill_tokens
        while budget > 0:
            if self._prefilling is None:
                if not self._waiting or len(self._active) >= self.config.max_slots:
                    return
                seq = self._waiting.popleft()
                seq.slot = len(self._active)
                seq.prefill_start_ns = time.time_ns()
                self._prefilling = seq
            seq = self._prefilling
            n = min(budget, len(seq.prompt) - seq.prefilled)
            done = seq.prefilled + n == len(seq.prompt)
            started = time.perf_counter()
            try:
                if self.config.debug_faults and seq.req.debug_fault == "prefill_oom":
                    raise MemoryError("injected out-of-memory in prefill")
                self._ensure_capacity(seq, n)
                # logits: [V] of the prompt's last position, only once the whole prompt is in the cache
                logits = self.decoder.prefill(self.cache, seq.slot, seq.prompt[seq.prefilled : seq.prefilled + n],
                                              seq.prefilled, want_logits=done)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                self._finish(seq, Finish.ERROR, f"out of memory in prefill: {exc}", ErrorKind.OUT_OF_MEMORY)
                self._release_done()
                continue
            self._prefill_s_per_token = _ema(self._prefill_s_per_token, (time.perf_counter() - started) / n)
            seq.prefilled += n
            budget -= n
            if done:
                self._prefilling = None
                self._active.append(seq)
                assert logits is not None
                self._sample_rows([seq], logits[None, :])
                self._release_done()

    def _decode(self) -> None:
        rows = self._active
        tokens = np.fromiter((s.last_token for s in rows), dtype=np.int64, count=len(rows))  # [B]
        positions = np.fromiter((s.cache_len for s in rows), dtype=np.int64, count=len(rows))  # [B]
        self._ensure_capacity()
        started = time.perf_counter()
        logits = self.decoder.decode_step(self.cache, tokens, positions)  # [B, V]
        self._sample_rows(list(rows), logits)
        self._step_s = _ema(self._step_s, time.perf_counter() - started)
        self._release_done()

    def _sample_rows(self, rows: list[_Sequence], logits: np.ndarray) -> None:
        """Pick each row's next token with its own parameters; logits: [B, V] float32."""
        greedy = logits.argmax(axis=-1) if not all(s.needs_logits for s in rows) else None  # [B]
        for i, seq in enumerate(rows):
            try:
                if not seq.needs_logits:
                    assert greedy is not None
                    self._accept(seq, int(greedy[i]), None)
                else:
                    self._accept(seq, *self._choose(seq, logits[i]))
            except Exception as exc:  # one sequence's failure ends that stream only
                log.exception("sequence failed")
                self._finish(seq, Finish.ERROR, f"{type(exc).__name__}: {exc}")

    def _choose(self, seq: _Sequence, raw: np.ndarray) -> tuple[int, np.ndarray]:
        req = seq.req
        row = raw.astype(np.float64)
        seen = None
        if req.sampling.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([seq.prompt, np.asarray(seq.generated, dtype=np.int64)]))
        banned = tuple(seq.eos) if len(seq.generated) < req.min_new_tokens else ()
        apply_penalties(row, seen, req.sampling.repetition_penalty, banned)
        token = sample_row(row, req.sampling, seq.rng)  # type: ignore[arg-type]
        return token, raw

    def _accept(self, seq: _Sequence, token: int, raw: np.ndarray | None) -> None:
        req = seq.req
        if self.config.debug_faults and req.debug_fault == f"error_at_{len(seq.generated)}":
            raise RuntimeError(f"injected fault at token {len(seq.generated)}")
        seq.generated.append(token)
        if seq.first_token_ns == 0:
            seq.first_token_ns = time.time_ns()
        logprob: float | None = None
        top: tuple[TopToken, ...] = ()
        if raw is not None and (req.logprobs or req.top_n):
            lp = log_softmax(raw.astype(np.float64))
            logprob = float(lp[token]) if req.logprobs else None
            top = top_alternatives(lp, req.top_n, self._decode_token)
        seq.pending.append(TokenOut(token, self._decode_token([token]), logprob, top))
        n = len(seq.generated)
        if token in seq.eos:
            self._finish(seq, Finish.EOS_TOKEN)  # the EOS id is reported in tokens, never as text
            return
        released, stop = seq.stops.feed(seq.detok.add(token))
        if stop is not None:
            self._finish(seq, Finish.STOP_SEQUENCE, text=released, stop=stop)
        elif n >= req.max_new_tokens:
            self._finish(seq, Finish.MAX_TOKENS, text=released)
        elif len(seq.prompt) + n >= self.config.max_context:
            self._finish(seq, Finish.CONTEXT_LENGTH, text=released)
        elif released:
            self._emit(seq, Chunk(released, tuple(seq.pending), prompt_token_ids=self._echo(seq)))
            seq.pending = []

    def _echo(self, seq: _Sequence) -> tuple[int, ...]:
        if seq.first_chunk_sent:
            return ()
        seq.first_chunk_sent = True
        return tuple(seq.req.prompt_ids) if seq.req.echo_prompt_tokens else ()

    def _finish(
        self, seq: _Sequence, reason: Finish, error: str = "", error_kind: ErrorKind | None = None,
        text: str = "", stop: str = "",
    ) -> None:
        if seq.finished:
            return
        seq.finished = True
        if reason is not Finish.STOP_SEQUENCE and reason is not Finish.ERROR:
            tail, matched = seq.stops.feed(seq.detok.flush())  # held bytes, as the full decode shows them
            text += tail
            if matched is not None:
                reason, stop = Finish.STOP_SEQUENCE, matched
            else:
                text += seq.stops.flush()  # held text that turned out not to be a stop
        now = time.time_ns()
        timings = Timings(seq.arrival_ns, seq.prefill_start_ns, seq.first_token_ns, now)
        self._emit(seq, Chunk(
            text, tuple(seq.pending), finish=reason, prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated), timings=timings, stop_sequence=stop, seed=seq.seed,
            error=error or ("internal error" if reason is Finish.ERROR else ""),
            error_kind=error_kind or (ErrorKind.INTERNAL if reason is Finish.ERROR else None),
            prompt_token_ids=self._echo(seq),
        ))
        seq.pending = []
        self._done.append(seq)

    def _release_done(self) -> None:
        """Free the slots of finished sequences. Only between steps: a row that has not taken its token yet
        would report one cached position too few if it were moved in the middle of a step."""
        done, self._done = self._done, []
        for seq in done:
            self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        """Free the sequence's slot, moving the last active slot (and the prefilling one) down to stay packed."""
        if seq is self._prefilling:
            self._prefilling = None
        elif seq.slot >= 0 and seq.slot < len(self._active) and self._active[seq.slot] is seq:
            last = self._active.pop()
            if last is not seq:
                self.cache.move(last.slot, seq.slot, last.cache_len)
                last.slot = seq.slot
                self._active[seq.slot] = last
            if self._prefilling is not None:
                self.cache.move(self._prefilling.slot, len(self._active), self._prefilling.prefilled)
                self._prefilling.slot = len(self._active)
        seq.slot = -1

    def _emit(self, seq: _Sequence, chunk: Chunk) -> None:
        seq.handle.emitted += 1
        self._outbox.append((seq.handle, chunk))

    def _publish(self) -> None:
        """Deliver this iteration's chunks: one call_soon_threadsafe per event loop, not one per token."""
        if not self._outbox:
            return
        by_loop: dict[Any, list[tuple[StreamHandle, list[Chunk]]]] = {}
        grouped: dict[int, tuple[StreamHandle, list[Chunk]]] = {}
        for handle, chunk in self._outbox:
            grouped.setdefault(id(handle), (handle, []))[1].append(chunk)
        self._outbox = []
        for handle, chunks in grouped.values():
            if handle.loop is None:
                handle.deliver(chunks)
            else:
                by_loop.setdefault(handle.loop, []).append((handle, chunks))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # the loop has closed: nobody is listening
                for handle, _ in items:
                    handle.cancel()

    def _fail_all(self, exc: BaseException, reason: Finish = Finish.ERROR) -> None:
        for seq in [*self._active, *( [self._prefilling] if self._prefilling else []), *self._waiting]:
            self._finish(seq, reason, f"{type(exc).__name__}: {exc}" if reason is Finish.ERROR else "")
        self._done = []
        self._waiting.clear()
        self._active.clear()
        self._prefilling = None

    def _debug_stall(self) -> None:
        """Test hook: a request with debug_fault "stall_ms_N" freezes the engine thread once for N ms."""
        for seq in [*self._active, *self._waiting]:
            fault = seq.req.debug_fault or ""
            if fault.startswith("stall_ms_"):
                seq.req.debug_fault = None
                time.sleep(int(fault.removeprefix("stall_ms_")) / 1000.0)

    def _warmup(self) -> None:
        """Run one prefill and one decode step so the first request does not pay for kernel set-up."""
        with paddle.no_grad():
            prompt = np.arange(8, dtype=np.int64) % self.model.config.vocab_size
            self.cache.ensure(16, 0)
            self.decoder.prefill(self.cache, 0, prompt, 0, want_logits=True)
            self.decoder.decode_step(self.cache, prompt[:1], np.array([8], dtype=np.int64))


def _put_all(put: Callable[[Chunk], None], batch: list[Chunk]) -> None:
    for chunk in batch:
        put(chunk)


def _ema(old: float, new: float, weight: float = 0.2) -> float:
    return new if old == 0.0 else old + weight * (new - old)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Paddle reports allocation failures as MemoryError on CPU and ResourceExhaustedError on GPU."""
    return isinstance(exc, MemoryError) or "ResourceExhausted" in type(exc).__name__ or \
        "out of memory" in str(exc).lower()


def _deliver_all(items: list[tuple[StreamHandle, list[Chunk]]]) -> None:
    for handle, chunks in items:
        handle.deliver(chunks)

