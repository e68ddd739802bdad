"""The engine's test seams. Production passes None; only tests install hooks (tests/support/hooks.py).

They let a test decide when decode steps happen and where faults strike, so that a test never depends on how
fast the machine is: a stream that must outlast a deadline simply gets no decode steps until the test allows them.
"""

from __future__ import annotations

from typing import Protocol


class EngineHooks(Protocol):
    def before_submit(self, request_id: str) -> None:
        """Called in submit, on the caller's thread, before the request is admitted; may raise (a failed submit)."""

    def before_iteration(self) -> None:
        """Called on the engine thread at the start of every iteration; may block (a frozen engine)."""

    def allow_decode(self) -> bool:
        """Called before each decode step; False skips decoding this iteration (the hook does any waiting)."""

    def in_step(self) -> None:
        """Called inside each timed forward step; a test may sleep here so the engine measures slower steps."""

    def before_prefill(self, request_id: str) -> None:
        """Called before each prefill chunk of a request; may raise, e.g. MemoryError for an injected OOM."""

    def before_accept(self, request_id: str, index: int) -> None:
        """Called before a request accepts its index-th generated token; may raise to fail that sequence."""
