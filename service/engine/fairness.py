"""Sharing slots and queue places between callers. Plain Python over sequences: no Paddle, unit-tested alone.

- Work-conserving: a caller alone may use every slot.
- The next request to start comes from the waiting caller that holds the fewest slots (ties: the one served least
  recently), so callers take turns rather than first come, first served.
- When every slot is taken and a waiting caller holds less than its fair share while another holds more, that
  other caller's cheapest sequence is preempted: it keeps its tokens, goes back to the front of its queue, and is
  re-prefilled when it gets a slot again (recompute preemption, as vLLM does).
- When the wait queue overflows, the newest request of the caller furthest over its share is displaced.
"""

from __future__ import annotations

import collections
from collections import Counter
from collections.abc import Iterable, Iterator

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
