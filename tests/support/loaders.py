"""Held calls: a model load (or any other call a server makes) that waits until the test lets it go on.

    loader = held_loader()                       # the real load_engine, held
    srv = ServerThread(base_config(model_dir), loader=loader)
    ...                                          # the server is up, its model not loaded: look at it
    loader.release()                             # the load goes on
    srv.wait_ready()

`Held(fn)` holds any other callable the same way (e.g. ServerState.tokenizing_hook); `entered` is set once a call
waits, so a test can wait for the server to have reached it. A call still held after `timeout_s` fails, so that a
test that forgets to release never hangs the suite.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from service.config import Config
from service.engine.api import EngineClient
from service.server import load_engine
from tests.support.hooks import StepGate

T = TypeVar("T")


class Held(Generic[T]):
    """`fn`, whose calls each wait (on the caller's thread) until release()."""

    def __init__(self, fn: Callable[..., T], timeout_s: float = 60.0) -> None:
        self._fn = fn
        self._released = threading.Event()
        self.entered = threading.Event()  # a call is waiting (or went through)
        self.timeout_s = timeout_s

    def __call__(self, *args: Any, **kwargs: Any) -> T:
        self.entered.set()
        if not self._released.wait(self.timeout_s):
            raise TimeoutError(f"held call not released within {self.timeout_s:g} s")
        return self._fn(*args, **kwargs)

    def release(self) -> None:
        self._released.set()


def held_loader(hooks: StepGate | None = None) -> Held[EngineClient]:
    """The real loader (service.server.load_engine, with `hooks` if given), held until release()."""

    def load(config: Config) -> EngineClient:
        return load_engine(config, hooks=hooks)

    return Held(load)
