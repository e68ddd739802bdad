"""Shared fixtures: a real tokenstream server on port 0 with the real Paddle engine and a small model."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
pytest.register_assert_rewrite("tests.support.properties")  # its checks' failures show their operands

from service.config import Config  # noqa: E402
from service.engine.checkpoints.loader import LoadedModel, load_model  # noqa: E402
from service.engine.tokenizer import Tokenizer  # noqa: E402
from tests.support.hooks import StepGate  # noqa: E402
from tests.support.properties import Reach  # noqa: E402
from tests.support.servers import ServerThread, base_config, started, suite_model_dir  # noqa: E402

# Property tests (those with no settings of their own) follow the profile HYPOTHESIS_PROFILE names: "default", the
# same 25 examples on every run (`make test`), or "deep", many more and different on each run (`make test-deep`).
# Each example runs real requests, so no deadline, and a function-scoped fixture is shared by its examples on purpose.
settings.register_profile("default", max_examples=25, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("deep", settings.get_profile("default"), max_examples=200, derandomize=False,
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
GATE_IDLE_S = 120  # an upper bound on waiting for the engine to empty after a test, not a speed assumption


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The test model: 2 layers, hidden 64, GQA 4/2, the real Qwen2 vocabulary (151,936), random weights."""
    return suite_model_dir()


@pytest.fixture(scope="session")
def loaded_model(model_dir: Path) -> LoadedModel:
    return load_model(model_dir)


@pytest.fixture(scope="session")
def tok(model_dir: Path) -> Tokenizer:
    """The suite model's tokenizer (a module serving another model overrides this)."""
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServerThread]:
    """One ready server per test module, with the default test limits."""
    srv = started(base_config(model_dir))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """The gated server's configuration: a module overrides this fixture for other limits or another model."""
    return base_config(model_dir)


@pytest.fixture(scope="module")
def gated_server(gated_config: Config) -> Iterator[ServerThread]:
    """A ready server whose engine takes decode steps only when the test permits them (`gate`)."""
    srv = started(gated_config, hooks=StepGate(gated=True))
    yield srv
    srv.close()


@pytest.fixture
def gate(gated_server: ServerThread) -> Iterator[StepGate]:
    """The gated server's gate, closed for the test; afterwards it lets anything left finish, and checks that
    nothing was left holding the engine (the next test counts slots from zero)."""
    gate = gated_server.hooks
    assert gate is not None
    gate.close()
    yield gate
    gate.thaw()
    gate.open()
    assert gated_server.engine.wait_until(lambda s: s.active + s.prefilling + s.waiting == 0, GATE_IDLE_S)
    gate.close()


@pytest.fixture
def reach(request: pytest.FixtureRequest) -> Iterator[Reach]:
    """A property test's tally of hard cases, shared by its examples: the test fails unless every case its
    `@pytest.mark.reaches(...)` names was met at least once."""
    marker = request.node.get_closest_marker("reaches")
    assert marker is not None, "a test that takes `reach` names its cases with @pytest.mark.reaches"
    tally = Reach(marker.args)
    yield tally
    assert tally.missing() == [], f"no example reached: {tally.missing()} (seen: {dict(tally.seen)})"


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
