"""Shared fixtures: a real tokenstream server on port 0 with the real Paddle engine and a small model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from service.engine.checkpoints.loader import LoadedModel, load_model  # noqa: E402
from tests.support.hooks import StepGate  # noqa: E402
from tests.support.servers import ServerThread, base_config, started, suite_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The test model: 2 layers, hidden 64, GQA 4/2, the real Qwen2 vocabulary (151,936), random weights."""
    return suite_model_dir()


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    """One ready server per test module, with the default test limits."""
    srv = started(base_config(model_dir))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def gated_server(model_dir: Path) -> Iterator[ServerThread]:
    """A ready server whose engine takes decode steps only when the test permits them (`server.hooks`)."""
    srv = started(base_config(model_dir), hooks=StepGate(gated=True))
    yield srv
    srv.close()


@pytest.fixture
def gate(gated_server: ServerThread) -> Iterator[StepGate]:
    """The gated server's gate, closed at the start and the end of each test."""
    assert gated_server.hooks is not None
    gated_server.hooks.close()
    yield gated_server.hooks
    gated_server.hooks.close()


@pytest.fixture
def stub(server: ServerThread) -> Iterator[Any]:
    from tokenstream.v1 import generation_pb2_grpc

    with server.channel() as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture
def gated_stub(gated_server: ServerThread) -> Iterator[Any]:
    from tokenstream.v1 import generation_pb2_grpc

    with gated_server.channel() as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)
