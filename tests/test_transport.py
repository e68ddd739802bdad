"""The gRPC front against a fake engine: status mapping, cancellation, admission and drain, exactly and fast.

The fake keeps the engine protocol (service/engine/api.py), so this is the servicer and the shared request life
(service/generation.py) alone. The same behaviours on the real engine: tests/test_faults.py (engine failures, submit
refusals, displacement, out of memory after tokens), tests/test_models.py (GetModelInfo's limits and recommended
sampling), tests/test_server.py, tests/test_http.py and tests/test_reliability.py (cancellation, deadlines, drain).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from service.engine.api import CallerQuotaError, QueueFullError
from service.engine.tokenizer import Tokenizer
from service.engine.types import Chunk, ErrorKind, Finish, TokenOut
from tests.support.fake_engine import FakeEngine
from tests.support.http_front import base_url
from tests.support.rpc import error_details
from tests.support.servers import ServerThread, base_config
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture
def fake(tok: Tokenizer) -> FakeEngine:
    return FakeEngine(tok)


@pytest.fixture
def front(fake: FakeEngine, model_dir: Path) -> Iterator[ServerThread]:
    srv = ServerThread(base_config(model_dir, max_new_tokens_limit=4096, grace_s=0.0), loader=lambda _: fake)
    srv.wait_ready()
    yield srv
    srv.close()


def call(srv: ServerThread, prompt: str = "hello world", **kw: object) -> list[pb.GenerateResponse]:
    with srv.channel() as ch:
        return list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt=prompt), timeout=10, **kw))


def test_a_stream_passes_through_unchanged(front: ServerThread, fake: FakeEngine, tok: Tokenizer) -> None:
    msgs = call(front, "hello world")
    assert [t.id for m in msgs for t in m.tokens] == tok.encode("hello world")
    assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    (req,) = fake.requests
    assert len(req.request_id) == 32 and req.caller == "ip:127.0.0.1" and req.deadline is not None


@pytest.mark.parametrize(("raised", "code", "kinds"), [
    (QueueFullError("all slots and the wait queue are full"), grpc.StatusCode.RESOURCE_EXHAUSTED,
     {"RetryInfo"}),
    (CallerQuotaError("ip:127.0.0.1", "streams", "two streams already", 2.5), grpc.StatusCode.RESOURCE_EXHAUSTED,
     {"RetryInfo", "QuotaFailure"}),
    (RuntimeError("secret internals"), grpc.StatusCode.INTERNAL, set()),
], ids=["queue-full", "quota", "internal"])
def test_submit_errors_map_to_statuses(front: ServerThread, fake: FakeEngine, raised: Exception,
                                       code: grpc.StatusCode, kinds: set[str]) -> None:
    def refuse(req: object) -> list:
        raise raised

    fake.script = refuse
    with pytest.raises(grpc.RpcError) as err:
        call(front)
    assert err.value.code() == code
    assert set(error_details(err.value).kinds) == kinds
    assert "secret internals" not in (err.value.details() or "")  # internals stay on the server


@pytest.mark.parametrize("kind", [ErrorKind.OUT_OF_MEMORY, ErrorKind.OVERLOADED])
def test_engine_refusals_before_any_token_are_resource_exhausted(front: ServerThread, fake: FakeEngine,
                                                                 kind: ErrorKind) -> None:
    fake.script = lambda req: [Chunk("", finish=Finish.ERROR, error="no room", error_kind=kind)]
    with pytest.raises(grpc.RpcError) as err:
        call(front)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_details(err.value).kinds == ["RetryInfo"]


def test_after_tokens_an_engine_error_is_a_final_message(front: ServerThread, fake: FakeEngine) -> None:
    fake.script = lambda req: [Chunk("a", (TokenOut(64, "a"),)), Chunk("", finish=Finish.ERROR, error="no room",
                                                                        error_kind=ErrorKind.OUT_OF_MEMORY)]
    msgs = call(front)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR and msgs[-1].error_message == "no room"


def test_a_failure_mid_stream_is_internal_without_internals(front: ServerThread, fake: FakeEngine) -> None:
    fake.script = lambda req: [Chunk("a", (TokenOut(64, "a"),)), RuntimeError("secret internals")]
    with pytest.raises(grpc.RpcError) as err:
        call(front)
    assert err.value.code() == grpc.StatusCode.INTERNAL and "secret" not in (err.value.details() or "")


def test_a_deadline_shorter_than_the_estimate_never_reaches_the_engine(front: ServerThread, fake: FakeEngine) -> None:
    fake.first_token_s = 10.0
    with pytest.raises(grpc.RpcError) as err:
        call(front)  # a 10 s deadline: 10 s of estimated wait is not less than it
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert fake.requests == []


def test_the_caller_leaving_cancels_the_engine_stream(front: ServerThread, fake: FakeEngine) -> None:
    fake.hold = asyncio.Event()
    with front.channel() as ch:
        stream = pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="hello"), timeout=10)
        assert fake.wait_for(lambda: bool(fake.streams))
        stream.cancel()
    assert fake.wait_for(lambda: fake.streams[0].cancelled)


def test_drain_refuses_new_calls_and_cancels_held_ones_with_a_final_message(front: ServerThread,
                                                                             fake: FakeEngine) -> None:
    fake.hold = asyncio.Event()
    with front.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        held = stub.Generate(pb.GenerateRequest(prompt="hello"), timeout=10)
        assert fake.wait_for(lambda: bool(fake.streams))
        front.call(front.running.drain(0.0))  # no grace: the held stream is cancelled at once
        assert fake.cancelled_all is True
        assert list(held)[-1].finish_reason == pb.FINISH_REASON_CANCELLED
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_model_info_reports_effective_limits_and_recommended_sampling(front: ServerThread) -> None:
    with front.channel() as ch:
        info = pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.max_context_length == 512 and info.max_new_tokens == 511  # the limit is 4096: capped
    assert info.recommended_sampling.temperature == pytest.approx(0.6)
    assert info.recommended_sampling.top_p == pytest.approx(0.9)


def test_the_request_id_is_checked_as_on_http(front: ServerThread, fake: FakeEngine) -> None:
    """A good x-request-id reaches the engine (and so logs and spans); an oversized or non-printable one is replaced
    by a fresh id, as the HTTP front does (before, gRPC took anything up to the 8 KB metadata limit)."""
    bad = ("x" * 129, "has space", "x" * 7000)
    for rid in ("req-1", *bad):
        call(front, metadata=[("x-request-id", rid)])
    got = [r.request_id for r in fake.requests]
    assert got[0] == "req-1"
    assert len(got) == 4 and not set(got[1:]) & set(bad)
    assert all(len(r) == 32 and r.isalnum() for r in got[1:])  # fresh uuid4 hex ids


def test_unset_sampling_means_greedy_on_grpc_and_the_recommendation_on_http(fake: FakeEngine, model_dir: Path) -> None:
    """Each front declares what unset sampling means (its Front's sampling_defaults); the shared lifecycle applies
    it: gRPC's contract says greedy, an OpenAI client gets the model's recommendation (the fake's 0.6 / 0.9)."""
    srv = ServerThread(base_config(model_dir, http_port=-1, grace_s=0.0), loader=lambda _: fake)
    try:
        srv.wait_ready()
        call(srv)
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(base_url(srv) + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        body["temperature"] = 0.2
        assert httpx.post(base_url(srv) + "/v1/chat/completions", json=body, timeout=30).status_code == 200
    finally:
        srv.close()
    grpc_req, http_req, http_set = (r.sampling for r in fake.requests)
    assert grpc_req.greedy is True and grpc_req.top_p == 1.0
    assert http_req.temperature == pytest.approx(0.6) and http_req.top_p == pytest.approx(0.9)
    assert http_set.temperature == pytest.approx(0.2) and http_set.top_p == pytest.approx(0.9)  # set wins


def test_draining_refusals_say_when_to_retry_on_both_fronts(fake: FakeEngine, model_dir: Path) -> None:
    """UNAVAILABLE while draining (or loading) carries RetryInfo on gRPC, and HTTP's 503 a Retry-After header, so a
    client retries on another replica instead of giving up (the SDK reads RetryInfo)."""
    srv = ServerThread(base_config(model_dir, http_port=-1, grace_s=0.0), loader=lambda _: fake)
    try:
        srv.wait_ready()
        srv.running.state.draining = True
        with pytest.raises(grpc.RpcError) as err:
            call(srv)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "RetryInfo" in error_details(err.value).kinds
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        refused = httpx.post(base_url(srv) + "/v1/chat/completions", json=body, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.headers
    finally:
        srv.running.state.draining = False
        srv.close()
