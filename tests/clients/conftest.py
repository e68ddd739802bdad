"""Fixtures for the client tests: the SDK on sys.path, a scripted fake GenerationService for retry tests, and the
count of calls a real server has finished."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
CLIENTS = HERE.parents[1] / "clients"
for path in (CLIENTS, HERE):  # CLIENTS until pyproject's pytest pythonpath lists clients/; HERE for the fakes
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="module")
def fake_server() -> Iterator[Any]:
    from tokenstream_fakes import FakeServer  # here: sys.path has this directory now

    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def fake(fake_server: Any) -> Any:
    fake_server.service.reset()
    return fake_server


@pytest.fixture
def finished_calls() -> Callable[[Any, str, str], float]:
    """finished_calls(server, finish_reason, grpc_code): the Generate calls a real server (ServerThread) has ended
    so, by its own metrics. A call's record is written before its final message is sent, and along with the engine
    cancel of a call the caller left."""

    def count(server: Any, finish_reason: str, grpc_code: str) -> float:
        labels = {"finish_reason": finish_reason, "grpc_code": grpc_code, "front": "grpc", "caller_class": "default"}
        return server.running.metrics.registry.get_sample_value("tokenstream_requests_total", labels) or 0.0

    return count
