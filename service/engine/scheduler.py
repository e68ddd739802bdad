"""The engine thread: continuous batching over a slot KV cache.

One thread owns the model. Requests arrive through a thread-safe inbox; each loop iteration
  1. admits new requests and ends cancelled, expired or unread ones, freeing their slots at once;
  2. plans this iteration's prompt chunks: waiting prompts get the next slots, long prompts go in chunks, and
     the prompt tokens are bounded by a time budget (a step may take prefill_stall_steps decode steps longer);
  3. runs one step: every active slot's next token and those prompt chunks, sharing each weight read; a prompt
     that completes takes its first token from the same step;
  4. hands each stream its chunks, one `call_soon_threadsafe` per event loop per iteration (delivery.py).
Per-token decisions (stops, finish reasons, text release) are the sequence's own (sequence.py), the token choice is
sampling.py's, and who may submit (callers' caps and shares, the first-token estimate) is fairness.py's.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import paddle

from service.engine.api import KV_BLOCK, EngineConfig, EngineStats, EngineStoppedError, ModelInfo
from service.engine.checkpoints.loader import LoadedModel
from service.engine.constraints import MaskBatch
from service.engine.decoder import DecoderOptions, LlamaDecoder, PrefillChunk
from service.engine.delivery import AsyncStream, Outbox, StreamHandle, iterate_sync
from service.engine.fairness import (
    CallerAdmission,
    FairQueue,
    displacement_victims,
    holders,
    preemption_victim,
)
from service.engine.hooks import EngineHooks
from service.engine.kernels import select as select_kernels
from service.engine.kv_cache import SlotKVCache
from service.engine.prefix_cache import PrefixCache
from service.engine.progress import Progress
from service.engine.sampling import batch_argmax, choose
from service.engine.sequence import SequenceState, verdict
from service.engine.tokenizer import Tokenizer
from service.engine.types import Chunk, ErrorKind, Finish, GenerationRequest, TopToken

log = logging.getLogger("tokenstream.engine")

IDLE_POLL_S = 0.5  # how long an idle engine waits on its inbox before looking again
MIN_PREFILL_CHUNK = 16  # prompt tokens a step carries at least, however slow prompt tokens have been


class Engine:
    def __init__(self, model: LoadedModel, config: EngineConfig, hooks: EngineHooks | None = None) -> None:
        self.model = model
        max_context = min(config.max_context, model.config.max_position_embeddings)
        self.config = dataclasses.replace(config, max_context=max_context)
        self._hooks = hooks  # None in production: test seams only
        paddle.set_device(self.config.device)
        kernels = select_kernels(self.config.kernels)
        self.decoder = LlamaDecoder(model.config, model.weights, max_context, self.config.dtype, kernels=kernels,
                                    options=DecoderOptions(threads=self.config.threads))
        self.cache = SlotKVCache(
            model.config.num_layers, self.config.max_slots, model.config.num_kv_heads, model.config.head_dim,
            max_context, self.config.dtype,
        )
        # Kept K/V go through host memory as float32; half-precision caches are not reused (not tested).
        budget = self.config.prefix_cache_mb << 20 if self.config.dtype == "float32" else 0
        self.prefix = PrefixCache(budget, KV_BLOCK, self.config.prefix_cache_scope)
        self._inbox: queue.SimpleQueue[SequenceState | None] = queue.SimpleQueue()
        self._waiting = FairQueue()  # engine thread only
        self._active: list[SequenceState] = []  # decode rows; index == slot
        self._prefilling: SequenceState | None = None  # partly prefilled, at slot len(_active)
        # Taken from the queue for this iteration's step and not yet placed by it: a failing iteration ends them too.
        self._planned: list[SequenceState] = []
        self._outbox = Outbox()
        self._done: list[SequenceState] = []  # finished in this step, slots not yet freed
        self._steps = 0
        self._iterations = 0
        self._preemptions = 0
        self._displaced = 0
        self._slow_readers = 0
        self._admission = CallerAdmission(self.config)  # streams in flight per caller, and the caps on them
        self._batch_sizes = [0] * (self.config.max_slots + 1)
        self._last_iteration = time.monotonic()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._dead = False  # the loop has ended (stopped, or the thread died): submit refuses
        self._cancel_all = False
        self._stepped = threading.Condition()
        # Moving averages: for deadline-aware admission, and for the prompt tokens a step may carry.
        self._prefill_s_per_token = 0.0  # a prompt token's share of a step with prompt chunks
        self._extra_s_per_token = 0.0  # what a prompt token adds to a decode step
        self._step_s = 0.0  # a plain decode step
        self._decode_token = model.tokenizer.decode
        self.info = ModelInfo(
            name=model.name, architecture=model.config.architecture, vocab_size=model.config.vocab_size,
            eos_token_ids=model.config.eos_token_ids, max_context=max_context, max_slots=self.config.max_slots,
            dtype=self.config.dtype, device=self.config.device,
            has_chat_template=bool(model.tokenizer.chat_template), generation_defaults=model.generation_defaults,
            prefix_cache_bytes=self.prefix.budget, prefix_cache_block=self.prefix.block,
            prefix_cache_scope=self.prefix.scope,
        )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

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

    def estimate_first_token_s(self, prompt_tokens: int, caller: str = "") -> float:
        """A rough wait until this prompt's first token, from the caller's fair place (CallerAdmission)."""
        return self._admission.first_token_s(
            caller, prompt_tokens, list(self._active), self._prefilling, len(self._waiting) + self._inbox.qsize(),
            self._step_s, self._prefill_s_per_token)

    def cancel_all(self) -> None:
        """End every stream at the next step with a final CANCELLED message (shutdown after the grace period)."""
        self._cancel_all = True
        self._inbox.put(None)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def stats(self) -> EngineStats:
        active = list(self._active)
        prefilling = self._prefilling
        lengths = [s.cache_len for s in active] + ([prefilling.prefilled] if prefilling else [])
        used = sum(lengths)
        return EngineStats(
            active=len(active), prefilling=int(prefilling is not None),
            waiting=len(self._waiting) + self._inbox.qsize(),
            cache_capacity=self.cache.capacity, cache_bytes=self.cache.nbytes, used_positions=used,
            max_slots=self.config.max_slots, max_context=self.config.max_context, steps=self._steps,
            iterations=self._iterations, last_iteration_monotonic=self._last_iteration, alive=self.alive,
            batch_sizes=tuple(self._batch_sizes), preemptions=self._preemptions, displaced=self._displaced,
            slow_readers=self._slow_readers, used_blocks=sum(-(-n // KV_BLOCK) for n in lengths),
            prefix_queries=self.prefix.queries, prefix_hits=self.prefix.hits,
            prefix_reused_tokens=self.prefix.reused_tokens, prefix_cache_bytes=self.prefix.nbytes,
        )

    # -- submission (any thread) -----------------------------------------------------------------

    def submit(
        self, req: GenerationRequest, deliver: Callable[[list[Chunk]], None],
        loop: asyncio.AbstractEventLoop | None = None, paced: bool = False,
    ) -> StreamHandle:
        """Queue a request. `deliver` gets the stream's chunks: on `loop` when given, else on the engine thread.
        `paced`: the consumer reports what it has read on the handle (see StreamHandle).
        EngineStoppedError when the engine loop has ended (checked again at the loop's end: none is left)."""
        if self._dead:
            raise EngineStoppedError("the engine has stopped")
        if self._hooks is not None:
            self._hooks.before_submit(req.request_id)
        self._admission.admit(req.caller, self._running())  # or refused: QueueFullError, CallerQuotaError
        handle = StreamHandle(deliver, loop, paced)
        now = time.time_ns()
        handle.marks.arrival_ns = now
        self._inbox.put(SequenceState(req, self.model.tokenizer, self.model.config.eos_token_ids,
                                      self.config.max_context, now, handle))
        return handle

    def _running(self) -> list[SequenceState]:
        """Sequences holding a slot: decoding, or being prefilled."""
        prefilling = self._prefilling
        return [*self._active, *([prefilling] if prefilling is not None else [])]

    def generate(self, req: GenerationRequest) -> AsyncStream:
        """The transport's view: an async iterator of chunks; cancel() it to stop the request."""
        return AsyncStream(lambda deliver, loop, paced: self.submit(req, deliver, loop, paced))

    def generate_sync(self, req: GenerationRequest) -> Iterator[Chunk]:
        """The same, for threads without an event loop (tests, benchmarks)."""
        return iterate_sync(lambda deliver, loop, paced: self.submit(req, deliver, loop, paced))

    # -- the loop (engine thread) ----------------------------------------------------------------

    def _run(self) -> None:
        paddle.set_device(self.config.device)
        reason, why = Finish.CANCELLED, RuntimeError("engine stopped")
        try:
            with paddle.no_grad():
                while not self._stopping:
                    try:
                        self._iteration()
                    except Exception as exc:  # a failed batch must not kill the engine
                        log.exception("engine iteration failed")
                        self._fail_all(exc)
                    self._outbox.publish()
                    with self._stepped:
                        self._stepped.notify_all()
        except BaseException as exc:  # the thread dies: no stream may be left waiting for it
            log.critical("engine thread died", exc_info=True)
            reason, why = Finish.ERROR, RuntimeError(f"the engine stopped ({type(exc).__name__})")
        finally:
            self._dead = True  # before the streams hear of it: a retry must not find a live-looking engine
            self._fail_all(why, reason)
            self._fail_inbox(why, reason)
            self._outbox.publish()
            with self._stepped:
                self._stepped.notify_all()

    def _fail_inbox(self, exc: BaseException, reason: Finish) -> None:
        """End requests submitted but never taken in (they raced the engine's end)."""
        while True:
            try:
                seq = self._inbox.get_nowait()
            except queue.Empty:
                return
            if seq is not None:
                self._finish(seq, reason, f"{type(exc).__name__}: {exc}" if reason is Finish.ERROR else "")
                self._admission.retire([seq])
                self._done = []

    def _iteration(self) -> None:
        self._admit(block=not (self._active or len(self._waiting) or self._prefilling))
        if self._hooks is not None:
            self._hooks.before_iteration()
        self._reap()
        self._preempt()
        plan = self._plan_prefill()
        decode = bool(self._active) and (self._hooks is None or self._hooks.allow_decode())
        if plan or decode:
            self._step(plan, decode)
        self._planned.clear()
        busy = bool(self._active or len(self._waiting) or self._prefilling)
        if self._busy and not busy:
            _return_heap()  # the burst is over: give its freed memory back
        self._busy = busy
        self._iterations += 1
        self._last_iteration = time.monotonic()

    def _admit(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=IDLE_POLL_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self._waiting.push(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
        for seq in displacement_victims(self._waiting, holders(self._running()), self.config.max_queue,
                                        self.config.max_slots):
            self._displaced += 1
            self._finish(seq, Finish.ERROR, "server busy: the wait queue is full and this caller has more than its "
                         "share of it; retry later", ErrorKind.OVERLOADED)

    def _preempt(self) -> None:
        """Send one sequence of a caller over its share back to the queue when another caller is starved."""
        victim = preemption_victim(self._running(), self._waiting, self.config.max_slots, self._prefilling)
        if victim is None:
            return
        self._preemptions += 1
        self._keep(victim)  # its K/V go to the prefix cache: when it starts again, it resumes from them if still there
        self._release(victim)  # its cache is dropped; it keeps its tokens, and is re-prefilled when it starts again
        victim.prefilled = 0
        self._waiting.push(victim, front=True)  # behind sequences paused before it: they resume in order

    def _reap(self) -> None:
        """End cancelled, expired and unread sequences wherever they are, freeing their slots now."""
        now = time.monotonic()
        cfg = self.config
        if self._cancel_all:
            for seq in self._everyone():
                seq.handle.cancel()
        for seq in list(self._waiting):
            if (why := verdict(seq, now, cfg.max_backlog, cfg.slow_reader_s)) is not None:
                self._waiting.remove(seq)
                self._finish(seq, *why)
        for seq in self._running():
            if (why := verdict(seq, now, cfg.max_backlog, cfg.slow_reader_s)) is not None:
                self._slow_readers += why[0] is Finish.ERROR
                self._finish(seq, *why)
        self._release_done()

    def _everyone(self) -> list[SequenceState]:
        running = self._running()
        return [*self._waiting, *running, *(s for s in self._planned if all(s is not r for r in running))]

    def _prefill_budget(self) -> int:
        """Prompt tokens this iteration: all of max_prefill_tokens when nothing decodes; otherwise what keeps a step
        within prefill_stall_steps decode steps of extra time, from the measured cost of a prompt token in a step."""
        cap = self.config.max_prefill_tokens
        per_token = self._extra_s_per_token or self._prefill_s_per_token
        if not self._active or self._step_s == 0.0 or per_token == 0.0:
            return cap
        tokens = int(self.config.prefill_stall_steps * self._step_s / per_token)
        return max(min(MIN_PREFILL_CHUNK, cap), min(cap, tokens))

    def _plan_prefill(self) -> list[tuple[SequenceState, int, bool]]:
        """This iteration's prompt chunks: (sequence, tokens, whether that completes it). An unfinished prompt goes
        on first; then waiting prompts, each in the next slot, while the budget lasts. Only the last may stay
        unfinished (it becomes _prefilling, at slot len(_active) once the others have joined): slots stay packed."""
        budget = self._prefill_budget()
        plan: list[tuple[SequenceState, int, bool]] = []
        if (going := self._prefilling) is not None:
            n = min(budget, len(going.context) - going.prefilled)
            plan.append((going, n, going.prefilled + n == len(going.context)))
            budget -= n
        while budget > 0 and (not plan or plan[-1][2]) and len(self._active) + len(plan) < self.config.max_slots:
            seq = self._waiting.pop_next(holders([*self._active, *(p[0] for p in plan)]))
            if seq is None:
                break
            self._planned.append(seq)
            seq.slot = len(self._active) + len(plan)
            if not seq.prefill_start_ns:
                seq.prefill_start_ns = seq.handle.marks.prefill_start_ns = time.time_ns()
            seq.context = seq.context_ids()  # the prompt; after a preemption, the tokens so far too
            seq.prefilled = self._reuse(seq)
            n = min(budget, len(seq.context) - seq.prefilled)
            plan.append((seq, n, seq.prefilled + n == len(seq.context)))
            budget -= n
        if self._hooks is not None:
            for seq, _, _ in list(plan):
                try:
                    self._hooks.before_prefill(seq.req.request_id)
                except MemoryError as exc:  # an injected out-of-memory: this prompt only
                    at = [p[0] for p in plan].index(seq)
                    for later, _, _ in reversed(plan[at + 1:]):  # not this step's: back to the queue, in order
                        self._unplan(later)
                    plan = plan[:at]
                    self._oom(seq, exc)
                    break
        if plan and not plan[-1][2]:
            self._prefilling = plan[-1][0]
        return plan

    def _unplan(self, seq: SequenceState) -> None:
        """Return a planned prompt to the front of the queue as it was before planning."""
        if seq is self._prefilling:
            self._prefilling = None
        seq.slot, seq.prefilled, seq.restore = -1, 0, None
        self._planned.remove(seq)
        self._waiting.push(seq, front=True)

    def _step(self, plan: list[tuple[SequenceState, int, bool]], decode: bool) -> None:
        """One forward: a token for every active row (when decoding), and this iteration's prompt chunks, sharing
        every weight read. Finished prompts join the active rows and take their first token from this step."""
        rows = list(self._active) if decode else []
        tokens = np.fromiter((s.last_token for s in rows), dtype=np.int64, count=len(rows))  # [B]
        positions = np.fromiter((s.cache_len for s in rows), dtype=np.int64, count=len(rows))  # [B]
        longest = max([s.cache_len + 1 for s in self._active] + [seq.prefilled + n for seq, n, _ in plan] + [1])
        self.cache.ensure(min(longest, self.config.max_context), len(self._active) + len(plan))
        for seq, _, _ in plan:  # prefix cache hits: their K/V into the slot, before the chunk that continues them
            if seq.restore is not None:
                self.prefix.restore(self.cache, seq.slot, seq.restore)
                seq.restore = None
        # A resumed sequence (after a preemption) knows its next token: it wants no logits.
        chunks = [PrefillChunk(seq.slot, seq.context[seq.prefilled : seq.prefilled + n], seq.prefilled,
                               done and not seq.generated) for seq, n, done in plan]
        # Structured output: the constrained rows' masks are computed together, beside the forward pass.
        vocab = self.model.config.vocab_size
        row_masks = MaskBatch([s.matcher for s in rows], vocab).start()
        new_masks = MaskBatch([seq.matcher for seq, _, done in plan if done and not seq.generated], vocab).start()
        started = time.perf_counter()
        if self._hooks is not None:
            self._hooks.in_step()
        try:
            logits, chunk_logits = self.decoder.step(self.cache, tokens, positions, chunks)  # [B, V], [V] each
        except Exception as exc:
            row_masks.masks(), new_masks.masks()  # done with the matchers before anything moves them on
            if not (plan and _is_out_of_memory(exc)):
                raise
            for seq, _, _ in plan:  # the prompts are what a step cannot fit; the rows retry at the next one
                self._oom(seq, exc)
            return
        spent = time.perf_counter() - started
        prompt_tokens = sum(n for _, n, _ in plan)
        if rows and not plan:
            self._step_s = _ema(self._step_s, spent)
        elif rows:
            self._extra_s_per_token = _ema(self._extra_s_per_token, max(spent - self._step_s, 0.0) / prompt_tokens)
        if prompt_tokens:
            self._prefill_s_per_token = _ema(self._prefill_s_per_token, spent / prompt_tokens)
        started_now: list[tuple[SequenceState, np.ndarray]] = []
        for (seq, n, done), out in zip(plan, chunk_logits, strict=True):
            seq.prefilled += n
            if done:
                if seq is self._prefilling:
                    self._prefilling = None
                self._active.append(seq)  # in slot order: seq.slot == its index
                if out is not None:
                    started_now.append((seq, out))
        if rows:
            assert logits is not None
            self._steps += 1
            self._batch_sizes[len(rows)] += 1
            self._sample_rows(rows, logits, row_masks.masks())
        if started_now:
            self._sample_rows([s for s, _ in started_now], np.stack([o for _, o in started_now]), new_masks.masks())
        self._release_done()

    def _namespace(self, seq: SequenceState) -> str:
        return self.prefix.namespace(seq.req.caller, seq.req.cache_salt)

    def _reuse(self, seq: SequenceState) -> int:
        """Positions of seq.context found in the prefix cache (to be copied into its slot by _step): at most all but
        the last token, whose chunk computes the logits (or, after a preemption, writes the last position)."""
        hit = self.prefix.lookup(self._namespace(seq), seq.context, len(seq.context) - 1)
        if seq.cached_tokens < 0:  # usage reports the first start's reuse (a resumed one's is its own K/V)
            seq.cached_tokens = min(hit.positions, len(seq.prompt))
        seq.restore = hit if hit.positions else None
        return hit.positions

    def _keep(self, seq: SequenceState) -> None:
        """Copy the full blocks of what the sequence's slot holds into the prefix cache (those not there yet).
        Nothing once the engine is stopping or cancelling every stream (drain): no request will reuse them, and
        copying would only hold back the streams' final messages."""
        if not self.prefix.enabled or self._stopping or self._cancel_all:
            return
        if seq.slot < 0 or seq.restore is not None:
            return  # no slot, or a hit not copied in yet: the slot holds nothing of this sequence
        written = seq.cache_len if seq.prefilled >= len(seq.context) else seq.prefilled  # decoding, or prefilling
        if written < self.prefix.block:
            return
        tokens = np.concatenate([seq.prompt, np.asarray(seq.generated, dtype=np.int64)])[:written]
        self.prefix.store(self.cache, seq.slot, self._namespace(seq), seq.req.caller, tokens)

    def _oom(self, seq: SequenceState, exc: BaseException) -> None:
        if seq is self._prefilling:
            self._prefilling = None
        self._finish(seq, Finish.ERROR, f"out of memory in prefill: {exc}", ErrorKind.OUT_OF_MEMORY)
        self._release_done()

    def _sample_rows(self, rows: list[SequenceState], logits: np.ndarray,
                     masks: list[np.ndarray | None] | None = None) -> None:
        """Each row takes its next token, chosen with its own parameters (sampling.py); logits: [B, V] float32;
        `masks`: the constrained rows' allowed tokens (None for the others)."""
        masks = masks or [None] * len(rows)
        for i, (seq, argmax) in enumerate(zip(rows, batch_argmax(rows, logits), strict=True)):
            try:
                if self._hooks is not None:
                    self._hooks.before_accept(seq.req.request_id, len(seq.generated))
                self._accept(seq, *choose(seq, logits[i], argmax, self._decode_token, masks[i]))
            except Exception as exc:  # one sequence's failure ends that stream only
                log.exception("sequence failed", extra={"fields": {"request_id": seq.req.request_id,
                                                                   "trace_id": seq.req.trace_id or None}})
                self._finish(seq, Finish.ERROR, f"{type(exc).__name__}: {exc}")

    def _accept(self, seq: SequenceState, token: int, logprob: float | None = None,
                top: tuple[TopToken, ...] = ()) -> None:
        now = time.time_ns()
        if not seq.generated:
            seq.handle.marks.first_token_ns = now
        chunk = seq.accept(token, now, logprob, top)
        if chunk is not None:
            self._outbox.put(seq.handle, chunk)
        if seq.finished:
            self._done.append(seq)

    def _finish(self, seq: SequenceState, reason: Finish, error: str = "", error_kind: ErrorKind | None = None) -> None:
        if seq.finished:
            return
        self._outbox.put(seq.handle, seq.finish(reason, time.time_ns(), error, error_kind))
        self._done.append(seq)

    def _release_done(self) -> None:
        """Free the slots of finished sequences. Only between steps: a row that has not taken its token yet
        would report one cached position too few if it were moved in the middle of a step."""
        done, self._done = self._done, []
        for seq in done:
            self._keep(seq)
            self._release(seq)
        self._admission.retire(done)

    def _release(self, seq: SequenceState) -> None:
        """Free the sequence's slot, moving the last active slot (and the prefilling one) down to stay packed."""
        if seq is self._prefilling:
            self._prefilling = None
        elif 0 <= seq.slot < len(self._active) and self._active[seq.slot] is seq:
            last = self._active.pop()
            if last is not seq:
                self.cache.move(last.slot, seq.slot, last.cache_len)
                last.slot = seq.slot
                self._active[seq.slot] = last
            if self._prefilling is not None:
                self.cache.move(self._prefilling.slot, len(self._active), self._prefilling.prefilled)
                self._prefilling.slot = len(self._active)
        seq.slot = -1

    def _fail_all(self, exc: BaseException, reason: Finish = Finish.ERROR) -> None:
        for seq in self._everyone():
            self._finish(seq, reason, f"{type(exc).__name__}: {exc}" if reason is Finish.ERROR else "")
        self._admission.retire(self._done)
        self._done = []
        self._waiting.clear()
        self._active.clear()
        self._planned.clear()
        self._prefilling = None

    def _warmup(self) -> None:
        """Run one prefill and one decode step so the first request does not pay for kernel set-up."""
        with paddle.no_grad(), Progress("warm-up"):
            prompt = np.arange(8, dtype=np.int64) % self.model.config.vocab_size
            self.cache.ensure(16, 0)
            self.decoder.prefill(self.cache, 0, prompt, 0, want_logits=True)
            self.decoder.decode_step(self.cache, prompt[:1], np.array([8], dtype=np.int64))


def _return_heap() -> None:
    """Return freed heap pages to the system. The KV cache's large blocks go back by themselves (they are mmapped);
    a burst's many small freed allocations (messages, logprobs, Python objects) stay in glibc's arenas until this.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Callable[[int], int] | None
try:  # glibc only; elsewhere nothing to do
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):
    _MALLOC_TRIM = None


def _ema(old: float, new: float, weight: float = 0.2) -> float:
    return new if old == 0.0 else old + weight * (new - old)


def _is_out_of_memory(exc: BaseException) -> bool:
    """Paddle reports allocation failures as MemoryError on CPU and ResourceExhaustedError on GPU."""
    return isinstance(exc, MemoryError) or "ResourceExhausted" in type(exc).__name__ or \
        "out of memory" in str(exc).lower()
