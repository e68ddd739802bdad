"""Sharing slots and queue places between callers, and the per-caller limits. Plain Python: no Paddle.

- Work-conserving: a caller alone may use every slot.
- The next request to start comes from the waiting caller that holds the fewest slots (ties: the one served least
  recently), so callers take turns rather than first come, first served.
- When every slot is taken (the one being prefilled counts) and a waiting caller holds less than its fair share
  while another holds more, that other caller's cheapest sequence is preempted: it keeps its tokens, goes back to
  its caller's queue ahead of requests not yet started but behind sequences paused before it (paused streams
  resume in the order they were paused), and is re-prefilled when it gets a slot again (recompute preemption, as
  vLLM does).
- When the wait queue overflows, the newest not-yet-started request of the caller furthest over its share is
  displaced. A paused sequence has sent tokens: it is never displaced, only delayed.
- Per-caller state exists only while the caller has work: a caller's queue and its last-served tick go when its
  last queued request leaves, so what an iteration walks never grows with the callers seen.
- At submission (CallerAdmission), a request is refused over its caller's caps, or when slots and queue are all
  taken and its caller already has its share of them.
"""

from __future__ import annotations

import collections
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence

from service.engine.api import CallerQuotaError, EngineConfig, QueueFullError
from service.engine.sequence import SequenceState


def fair_share(capacity: int, callers: int) -> float:
    return capacity / max(1, callers)


def holders(running: Iterable[SequenceState]) -> Counter[str]:
    """Slots held per caller (per sub-caller, where a gateway named one: GenerationRequest.fair_caller)."""
    return Counter(s.req.fair_caller for s in running)


class FairQueue:
    """Requests waiting for a slot: one FIFO per caller (per sub-caller where a gateway named one)."""

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[SequenceState]] = {}
        self._served: dict[str, int] = {}  # caller -> tick of its last start
        self._tick = 0
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[SequenceState]:
        return (s for q in list(self._queues.values()) for s in list(q))

    def count(self, caller: str) -> int:
        q = self._queues.get(caller)
        return len(q) if q else 0

    def callers(self) -> list[str]:
        return [c for c, q in self._queues.items() if q]

    def push(self, seq: SequenceState, front: bool = False) -> None:
        """Queue a request at the back of its caller's queue; `front`: a preempted sequence, which goes ahead of
        the requests not yet started but behind the sequences paused before it (those that have tokens)."""
        q = self._queues.setdefault(seq.req.fair_caller, collections.deque())
        if front:
            paused = 0
            while paused < len(q) and q[paused].generated:
                paused += 1
            q.insert(paused, seq)
        else:
            q.append(seq)
        self._len += 1

    def _drop_if_empty(self, caller: str) -> None:
        if not self._queues[caller]:
            del self._queues[caller]  # keeps the dicts bounded by the callers waiting now
            self._served.pop(caller, None)

    def remove(self, seq: SequenceState) -> None:
        self._queues[seq.req.fair_caller].remove(seq)
        self._len -= 1
        self._drop_if_empty(seq.req.fair_caller)

    def newest_unstarted(self, caller: str) -> SequenceState | None:
        """The caller's newest queued request that has sent nothing (not a paused sequence), if any."""
        q = self._queues.get(caller)
        return q[-1] if q and not q[-1].generated else None

    def pop_newest(self, caller: str) -> SequenceState:
        """The caller's newest queued request, which must not have sent tokens (see newest_unstarted)."""
        seq = self._queues[caller].pop()
        assert not seq.generated, "a sequence that sent tokens is never displaced"
        self._len -= 1
        self._drop_if_empty(caller)
        return seq

    def pop_next(self, held: Counter[str]) -> SequenceState | None:
        """The next request to start: among the callers whose next request has the highest priority (the gateway's
        objective), from the one holding the fewest slots, least recently served."""
        waiting = self.callers()
        if not waiting:
            return None
        caller = min(waiting, key=lambda c: (-self._queues[c][0].req.priority, held[c], self._served.get(c, -1)))
        self._tick += 1
        self._served[caller] = self._tick
        self._len -= 1
        seq = self._queues[caller].popleft()
        self._drop_if_empty(caller)
        return seq

    def clear(self) -> None:
        self._queues.clear()
        self._served.clear()
        self._len = 0


def preemption_victim(running: list[SequenceState], queue: FairQueue, max_slots: int,
                      prefilling: SequenceState | None = None) -> SequenceState | None:
    """A running sequence to send back to the queue so that a starved caller can start, or None.
    `running`: every sequence holding a slot, `prefilling` (the one being prefilled, never the victim) included.

    Only when every slot is taken, a waiting caller holds less than its fair share, and another holds more than its
    share and at least two slots more (so that a move never just swaps who is short: no flapping). The victim is
    that caller's decoding sequence that is cheapest to recompute (the shortest context).
    """
    if len(running) < max_slots or not len(queue):
        return None
    held = holders(running)
    waiting = queue.callers()
    share = fair_share(max_slots, len(set(held) | set(waiting)))
    starved = min(waiting, key=lambda c: held[c])
    heaviest = max(held, key=lambda c: held[c])
    if not (held[starved] < share < held[heaviest] and held[heaviest] - held[starved] >= 2):
        return None
    candidates = [s for s in running if s.req.fair_caller == heaviest and s.generated and s is not prefilling]
    return min(candidates, key=lambda s: s.cache_len) if candidates else None


def displacement_victims(queue: FairQueue, held: Counter[str], max_queue: int, max_slots: int) -> list[SequenceState]:
    """Queued requests to refuse after all, newest first, while the queue is over its bound and some caller has
    more than its share of slots and queue places together. Only requests that have not started are refused: a
    paused (preempted) sequence has sent tokens, and its reader must see only a pause. An overflow that no
    caller over its share can relieve stays (the submit-side rule bounds it)."""
    out: list[SequenceState] = []
    while len(queue) > max_queue:
        waiting = [c for c in queue.callers() if queue.newest_unstarted(c) is not None]
        if not waiting:
            break
        share = fair_share(max_slots + max_queue, len(set(held) | set(queue.callers())))
        heaviest = max(waiting, key=lambda c: held[c] + queue.count(c))
        if held[heaviest] + queue.count(heaviest) <= share:
            break
        out.append(queue.pop_newest(heaviest))
    return out


class CallerAdmission:
    """Streams submitted and not yet finished, per caller, and the admission of new ones against them.

    Written by submit (any thread) and the engine thread, under one lock, so that admission can share the queue
    fairly before the engine sees a request.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._inflight: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, caller: str, running: Sequence[SequenceState]) -> None:
        """Count the request against its caller, or refuse it: a caller's own caps, then the shared bound.
        `running`: the sequences holding a slot now.

        When slots and queue are all taken, a caller with less than its share of them still gets in (the engine
        then displaces a queued request of a caller over its share), so one caller cannot lock the others out.
        """
        cfg = self.config
        with self._lock:
            mine = self._inflight[caller]
            if cfg.caller_max_streams and mine >= cfg.caller_max_streams:
                raise CallerQuotaError(caller, "streams", f"this caller already has {mine} streams running or "
                                       f"queued, its limit (caller_max_streams={cfg.caller_max_streams})")
            if cfg.caller_max_queued:
                free = cfg.max_slots - len(running)  # requests not yet started that will find a slot at once
                queued = mine - sum(1 for s in running if s.req.caller == caller) - free
                if queued >= cfg.caller_max_queued:
                    raise CallerQuotaError(caller, "queued", f"this caller already has {queued} requests waiting "
                                           f"for a slot, its limit (caller_max_queued={cfg.caller_max_queued})")
            capacity = cfg.max_slots + cfg.max_queue
            total = sum(self._inflight.values())
            if total >= capacity:
                callers = len(self._inflight) + (caller not in self._inflight)
                if mine >= fair_share(capacity, callers) or total >= 2 * capacity:
                    raise QueueFullError("all slots and the wait queue are full")
            self._inflight[caller] += 1

    def retire(self, done: Iterable[SequenceState]) -> None:
        """Finished sequences no longer count against their callers."""
        with self._lock:
            for seq in done:
                self._inflight[seq.req.caller] -= 1
                if self._inflight[seq.req.caller] <= 0:
                    del self._inflight[seq.req.caller]

    def first_token_s(self, caller: str, prompt_tokens: int, active: Sequence[SequenceState],
                      prefilling: SequenceState | None, queued: int, step_s: float,
                      prefill_s_per_token: float) -> float:
        """A rough wait until this prompt's first token: queueing for a slot, then its prefill and one step.
        `active`: the decoding sequences; `prefilling`: the prompt holding the next slot; `queued`: requests
        waiting; `step_s`, `prefill_s_per_token`: the engine's measured decode step and prompt token.

        When every slot is taken, the request needs the k-th slot to free; a slot frees at the latest when its
        sequence reaches max_new_tokens or its deadline. Slots are shared fairly, so k follows the caller's own
        place: a caller below its fair share starts within a step (a preemption, if need be); one at or over it
        waits behind its own queued requests, its turn coming once in every round of the callers.
        """
        now = time.monotonic()
        # By the caller whose caps count (a token), not its sub-callers: the estimate is of the token's place.
        running = Counter(s.req.caller for s in [*active, *([prefilling] if prefilling is not None else [])])
        with self._lock:
            callers = set(self._inflight) | {caller}
            mine_queued = max(0, self._inflight[caller] - running[caller])
        free = self.config.max_slots - len(active) - (prefilling is not None)
        if free > queued or running[caller] + mine_queued < fair_share(self.config.max_slots, len(callers)):
            ahead = 0
        else:  # its turn comes once per round of the callers, and never after the whole queue's
            ahead = min((mine_queued + 1) * len(callers), queued + 1 - free)
        queue_s = 0.0
        if ahead > 0 and active:  # the ahead-th slot to free
            left = sorted(
                min((s.req.max_new_tokens - len(s.generated)) * step_s,
                    (s.req.deadline - now) if s.req.deadline is not None else float("inf"))
                for s in active
            )
            queue_s = max(0.0, left[min(ahead, len(left)) - 1])
        return queue_s + prompt_tokens * prefill_s_per_token + step_s
