"""EngineHooks for tests: decode steps that happen only when the test allows them, a frozen engine, faults.

Nothing here is reachable from production: the engine takes hooks as a constructor argument that only tests pass.
"""

from __future__ import annotations

import threading
import time


class EngineKilled(BaseException):
    """Raised on the engine thread by StepGate.kill(): not an Exception, so nothing in the loop catches it."""

GATE_POLL_S = 0.02  # how long a closed gate holds the engine before letting it look at deadlines and cancels again


class StepGate:
    """A gate on decode steps (open, closed, or N permits), an optional minimum step time, a freeze, and faults.

    With the gate closed, prefill still runs (so streams get their first token) and the engine keeps reaping
    cancelled and expired streams, but no stream gets a second token until the test permits steps.
    """

    def __init__(self, gated: bool = False, step_delay_s: float = 0.0) -> None:
        self._cond = threading.Condition()
        self._open = not gated
        self._permits = 0
        self._thawed = threading.Event()
        self._thawed.set()
        self.frozen = threading.Event()  # set while the engine thread sits in a freeze
        self.step_delay_s = step_delay_s  # a floor under each step's measured time, for admission-estimate tests
        self._faults: dict[str, str] = {}
        self._killed = False
        self.decode_steps = 0  # decode steps allowed so far (engine thread)
        self.first_token_step: dict[str, int] = {}  # request id -> decode_steps when it took its first token

    # -- the test's side ---------------------------------------------------------------------------

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open, self._permits = False, 0

    def permit(self, steps: int) -> None:
        with self._cond:
            self._permits += steps
            self._cond.notify_all()

    def freeze(self) -> None:
        """Block the engine thread at the start of its next iteration until thaw()."""
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def kill(self) -> None:
        """Make the engine thread die at the start of its next iteration (a bug or a fatal signal would)."""
        self._killed = True
        with self._cond:
            self._cond.notify_all()

    def fail(self, request_id: str, fault: str) -> None:
        """`prefill_oom` (MemoryError in prefill) or `error_at_N` (the N-th generated token raises)."""
        self._faults[request_id] = fault

    # -- the engine's side (EngineHooks) -----------------------------------------------------------

    def before_iteration(self) -> None:
        if self._killed:
            raise EngineKilled("killed by the test")
        if not self._thawed.is_set():
            self.frozen.set()
            self._thawed.wait()
            self.frozen.clear()

    def allow_decode(self) -> bool:
        with self._cond:
            if not self._open and self._permits == 0:
                self._cond.wait(GATE_POLL_S)
            if not self._open:
                if self._permits == 0:
                    return False
                self._permits -= 1
            self.decode_steps += 1
        return True

    def in_step(self) -> None:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)  # the injected step time, which the engine's estimates see; not a wait

    def before_prefill(self, request_id: str) -> None:
        if self._faults.get(request_id) == "prefill_oom":
            raise MemoryError("injected out-of-memory in prefill")

    def before_accept(self, request_id: str, index: int) -> None:
        if index == 0:
            self.first_token_step.setdefault(request_id, self.decode_steps)
        if self._faults.get(request_id) == f"error_at_{index}":
            raise RuntimeError(f"injected fault at token {index}")
