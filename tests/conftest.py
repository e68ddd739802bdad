"""Shared fixtures: a real tokenstream server on port 0 with the real Paddle engine and a small model."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from service.config import Config  # noqa: E402
from service.engine.default_model import TEST, ensure_random_model  # noqa: E402
from service.engine.engine import Engine  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402
from service.server import RunningServer, load_engine, start_server  # noqa: E402

CACHE = Path(os.environ.get("TOKENSTREAM_TEST_CACHE", Path.home() / ".cache" / "tokenstream" / "test-models"))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The test model: 2 layers, hidden 64, GQA 4/2, the real Qwen2 vocabulary (151,936), random weights."""
    return ensure_random_model(TEST, CACHE)


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


def base_config(model_dir: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = dict(
        host="127.0.0.1", port=0, model_dir=str(model_dir), max_context=512, max_slots=8, max_queue=16,
        max_new_tokens=32, grace_s=5.0,
    )
    values.update(overrides)
    return Config(**values)


class ServerThread:
    """A real grpc.aio server on its own event loop in a background thread; tests talk to it over TCP."""

    def __init__(self, config: Config, tracer_provider: Any = None,
                 loader: Callable[[Config], Any] = load_engine) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(config, tracer_provider=tracer_provider, loader=loader))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.call(self.running.wait_ready(), timeout)

    @property
    def engine(self) -> Engine:
        assert self.running.state.engine is not None
        return self.running.state.engine

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def close(self) -> None:
        try:
            self.call(self.running.stop(0), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def started(config: Config, **kwargs: Any) -> ServerThread:
    server = ServerThread(config, **kwargs)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    """One ready server per test module, with the default test limits."""
    srv = started(base_config(model_dir))
    yield srv
    srv.close()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[Any]:
    from tokenstream.v1 import generation_pb2_grpc

    with server.channel() as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)
