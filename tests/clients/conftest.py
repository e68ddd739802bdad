"""Fixtures for the client tests: the SDK on sys.path, and a scripted fake GenerationService for retry tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator
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
