"""Sharing slots and queue places between callers, and the per-caller limits. Plain Python: no Paddle.

- Work-conserving: a caller alone may use every slot.
- The next request to start comes from the waiting caller that holds the fewest slots (ties: the one served least
  recently), so callers take turns rather than first come, first served.
- When every slot is taken and a waiting caller holds less than its fair share while another holds more, that
  other caller's cheapest sequence is preempted: it keeps its tokens, goes back to the front of its queue, and is
  re-prefilled when it gets a slot again (recompute preemption, as vLLM does).
- When the wait queue overflows, the newest request of the caller furthest over its share is displaced.
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
    """Slots held per caller."""
    return Counter(s.req.caller for s in running)


class FairQueue:
    """Requests waiting for a slot: one FIFO per caller."""

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
        q = self._queues.setdefault(seq.req.caller, collections.deque())
        if front:
            q.appendleft(seq)
        else:
            q.append(seq)
        self._len += 1

    def remove(self, seq: SequenceState) -> None:
        self._queues[seq.req.caller].remove(seq)
        self._len -= 1

    def pop_newest(self, caller: str) -> SequenceState:
        self._len -= 1
        return self._queues[caller].pop()

    def pop_next(self, held: Counter[str]) -> SequenceState | None:
        """The next request to start: from the waiting caller holding the fewest slots, least recently served."""
        waiting = self.callers()
        if not waiting:
            return None
        caller = min(waiting, key=lambda c: (held[c], self._served.get(c, -1)))
        self._tick += 1
        self._served[caller] = self._tick
        self._len -= 1
        seq = self._queues[caller].popleft()
        if not self._queues[caller]:
            del self._queues[caller]  # keeps the dict bounded by the callers waiting now
        return seq

    def clear(self) -> None:
        self._queues.clear()
        self._len = 0


def preemption_victim(running: list[SequenceState], queue: FairQueue, max_slots: int) -> SequenceState | None:
    """A running sequence to send back to the queue so that a starved caller can start, or None.

    Only when every slot is taken, a waiting caller holds less than its fair share, and another holds more than its
    share and at least two slots more (so that a move never just swaps who is short: no flapping). The victim is
    that caller's sequence that is cheapest to recompute (the shortest context).
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
    candidates = [s for s in running if s.req.caller == heaviest and s.generated]
    return min(candidates, key=lambda s: s.cache_len) if candidates else None


def displacement_victims(queue: FairQueue, held: Counter[str], max_queue: int, max_slots: int) -> list[SequenceState]:
    """Queued requests to refuse after all, newest first, while the queue is over its bound and some caller has
    more than its share of slots and queue places together. An overflow whose callers are all within their
    share stays (the submit-side rule bounds it)."""
    out: list[SequenceState] = []
    while len(queue) > max_queue:
        waiting = queue.callers()
        share = fair_share(max_slots + max_queue, len(set(held) | set(waiting)))
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
        running = holders([*active, *([prefilling] if prefilling is not None else [])])
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
