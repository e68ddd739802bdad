"""EngineHooks for tests: decode steps that happen only when the test allows them, a frozen engine, faults.

Nothing here is reachable from production: the engine takes hooks as a constructor argument that only tests pass.
"""

from __future__ import annotations

import threading
import time


class EngineKilled(BaseException):
    """Raised on the engine thread by StepGate.kill(): not an Exception, so nothing in the loop catches it."""

GATE_POLL_S = 0.02  # how long a closed gate holds the engine before letting it look at deadlines and cancels again
# In every injected exception's text: what Paddle's errors carry (paths, shapes), which only the server's log may show.
FAULT_TEXT = "at /opt/paddle/kernels/secret_op.cc:42, tensor shape [3, 7]"


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
        self._break_iteration = False
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
        """A fault for one request, raised where the engine handles that request: `prefill_oom` (MemoryError in its
        prefill), `prefill_error` (RuntimeError there: the whole iteration fails), `submit_error` (RuntimeError from
        submit, before the engine takes the request), `error_at_N` (RuntimeError as it
        accepts its N-th generated token) or `oom_at_N` (MemoryError there). The last two end that sequence alone."""
        self._faults[request_id] = fault

    def break_iteration(self) -> None:
        """Make the engine's next iteration raise a RuntimeError outside any one sequence (as a failed step's Paddle
        error would): the engine ends every stream it holds with an error, and goes on serving."""
        self._break_iteration = True

    # -- the engine's side (EngineHooks) -----------------------------------------------------------

    def before_iteration(self) -> None:
        if self._killed:
            raise EngineKilled("killed by the test")
        if self._break_iteration:
            self._break_iteration = False
            raise RuntimeError(f"injected failure of an iteration {FAULT_TEXT}")
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

    def before_submit(self, request_id: str) -> None:
        if self._faults.get(request_id) == "submit_error":
            raise RuntimeError(f"injected failure at submit {FAULT_TEXT}")

    def before_prefill(self, request_id: str) -> None:
        if self._faults.get(request_id) == "prefill_oom":
            raise MemoryError(f"injected out-of-memory in prefill {FAULT_TEXT}")
        if self._faults.get(request_id) == "prefill_error":
            raise RuntimeError(f"injected failure in prefill {FAULT_TEXT}")

    def before_accept(self, request_id: str, index: int) -> None:
        if index == 0:
            self.first_token_step.setdefault(request_id, self.decode_steps)
        fault = self._faults.get(request_id)
        if fault == f"error_at_{index}":
            raise RuntimeError(f"injected fault at token {index} {FAULT_TEXT}")
        if fault == f"oom_at_{index}":
            raise MemoryError(f"injected out-of-memory at token {index} {FAULT_TEXT}")
