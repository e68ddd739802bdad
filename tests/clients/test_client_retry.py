"""Retries, backoff and call metadata of the SDK, against a scripted fake server (sync and asyncio clients).

The same retries against a real server on the real engine, and round-robin, are in test_client_retry_real.py."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from tokenstream_fakes import FakeServer, Step

from tokenstream_client import AsyncClient, Client, Delta, FinishReason, RetryPolicy, TLSConfig, TokenstreamError
from tokenstream_client._base import Attempts
from tokenstream_client.channel import KEEPALIVE_OPTIONS, channel_options

FAST = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
Outcome = tuple[list[Delta], TokenstreamError | None, int]


def generate_sync(target: str, retry: RetryPolicy = FAST, **kwargs: Any) -> Outcome:
    with Client(target, retry=retry) as client:
        stream = client.generate("x", **kwargs)
        deltas: list[Delta] = []
        try:
            deltas.extend(stream)  # keeps what arrived before an error
        except TokenstreamError as error:
            return deltas, error, stream.attempts
        return deltas, None, stream.attempts


def generate_async(target: str, retry: RetryPolicy = FAST, **kwargs: Any) -> Outcome:
    async def run() -> Outcome:
        async with AsyncClient(target, retry=retry) as client:
            stream = client.generate("x", **kwargs)
            deltas: list[Delta] = []
            try:
                async for delta in stream:
                    deltas.append(delta)
            except TokenstreamError as error:
                return deltas, error, stream.attempts
            return deltas, None, stream.attempts

    return asyncio.run(run())


GENERATE: dict[str, Callable[..., Outcome]] = {"sync": generate_sync, "async": generate_async}
both = pytest.mark.parametrize("kind", sorted(GENERATE))


@both
def test_resource_exhausted_with_retry_info_is_retried_after_its_delay(fake: FakeServer, kind: str) -> None:
    fake.service.reset(Step(tokens=0, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.2))
    deltas, error, attempts = GENERATE[kind](fake.target, request_id="rid-1")
    assert error is None
    assert attempts == 2 and len(fake.service.calls) == 2
    assert fake.service.arrivals[1] - fake.service.arrivals[0] >= 0.2  # the server's delay was honoured
    assert [c["x-request-id"] for c in fake.service.calls] == ["rid-1", "rid-1"]  # one logical request
    assert "".join(d.text for d in deltas) == "t0 t1 t2 "
    assert deltas[-1].finish_reason is FinishReason.MAX_TOKENS


@both
def test_resource_exhausted_without_retry_info_is_not_retried(fake: FakeServer, kind: str) -> None:
    fake.service.reset(Step(tokens=0, code=grpc.StatusCode.RESOURCE_EXHAUSTED))
    _, error, attempts = GENERATE[kind](fake.target)
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert attempts == 1 and len(fake.service.calls) == 1


@both
def test_unavailable_before_the_first_message_is_retried(fake: FakeServer, kind: str) -> None:
    unavailable = Step(tokens=0, code=grpc.StatusCode.UNAVAILABLE, message="loading")
    fake.service.reset(unavailable, unavailable)
    deltas, error, attempts = GENERATE[kind](fake.target)
    assert error is None and attempts == 3 and len(fake.service.calls) == 3
    assert deltas[-1].finish_reason is FinishReason.MAX_TOKENS


@both
def test_unavailable_after_the_first_token_is_not_retried(fake: FakeServer, kind: str) -> None:
    fake.service.reset(Step(tokens=2, code=grpc.StatusCode.UNAVAILABLE, message="connection lost"))
    deltas, error, attempts = GENERATE[kind](fake.target)
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE
    assert error.message == "connection lost"
    assert [d.token_ids for d in deltas] == [[100], [101]]  # what arrived is delivered, then the error
    assert attempts == 1 and len(fake.service.calls) == 1


@both
def test_retry_info_after_the_first_token_is_not_retried(fake: FakeServer, kind: str) -> None:
    fake.service.reset(Step(tokens=1, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.01))
    _, error, attempts = GENERATE[kind](fake.target)
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert attempts == 1 and len(fake.service.calls) == 1


@both
def test_invalid_argument_is_not_retried_and_reports_field_violations(fake: FakeServer, kind: str) -> None:
    fake.service.reset(Step(tokens=0, code=grpc.StatusCode.INVALID_ARGUMENT, message="bad top_p",
                            violations=(("sampling.top_p", "must be in (0, 1]"),)))
    _, error, attempts = GENERATE[kind](fake.target)
    assert error is not None and error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [(v.field, v.description) for v in error.field_violations] == [("sampling.top_p", "must be in (0, 1]")]
    assert "INVALID_ARGUMENT: bad top_p" in str(error) and "sampling.top_p" in str(error)
    assert attempts == 1 and len(fake.service.calls) == 1


@both
def test_attempts_are_bounded(fake: FakeServer, kind: str) -> None:
    fake.service.reset(*[Step(tokens=0, code=grpc.StatusCode.UNAVAILABLE)] * 10)
    _, error, attempts = GENERATE[kind](fake.target, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01))
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE
    assert attempts == error.attempts == 3 and len(fake.service.calls) == 3


@both
def test_no_retry_is_started_that_would_end_after_the_deadline(
    fake: FakeServer, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server asks for 20 s, the call has 10: the error is raised at once, with no backoff taken."""
    backoffs: list[float | TokenstreamError] = []  # what each failed attempt decided: a delay, or the error
    decide = Attempts.backoff

    def recorded(self: Attempts, rpc_error: grpc.RpcError) -> float:
        try:
            delay = decide(self, rpc_error)
        except TokenstreamError as error:
            backoffs.append(error)
            raise
        backoffs.append(delay)
        return delay

    monkeypatch.setattr(Attempts, "backoff", recorded)  # every backoff, sync and async, is decided there
    fake.service.reset(Step(tokens=0, code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=20.0))
    _, error, attempts = GENERATE[kind](fake.target, timeout=10.0)
    assert backoffs == [error]  # the one failure decided no delay, but to raise: no backoff was waited
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_delay == 20.0
    assert attempts == 1 and len(fake.service.calls) == 1


@both
def test_an_expired_deadline_starts_no_attempt(fake: FakeServer, kind: str) -> None:
    """Streams and unary calls share one attempt loop: each attempt checks the deadline before it starts."""
    _, error, attempts = GENERATE[kind](fake.target, timeout=0.0)
    assert error is not None
    assert (error.code, error.message, attempts) == (
        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started", 0)

    def tokenize_sync() -> None:
        with Client(fake.target) as client:
            client.tokenize("x", timeout=0.0)

    async def tokenize_async() -> None:
        async with AsyncClient(fake.target) as client:
            await client.tokenize("x", timeout=0.0)

    with pytest.raises(TokenstreamError) as info:
        tokenize_sync() if kind == "sync" else asyncio.run(tokenize_async())
    assert (info.value.code, info.value.attempts) == (grpc.StatusCode.DEADLINE_EXCEEDED, 0)
    assert fake.service.calls == []


def test_unary_calls_are_retried_on_unavailable(fake: FakeServer) -> None:
    fake.service.reset(Step(code=grpc.StatusCode.UNAVAILABLE), Step(code=grpc.StatusCode.UNAVAILABLE))
    with Client(fake.target, retry=FAST) as client:
        assert client.tokenize("x").ids == (1, 2)
    assert len(fake.service.calls) == 3

    async def run() -> tuple[int, ...]:
        async with AsyncClient(fake.target, retry=FAST) as client:
            return (await client.tokenize("x")).ids

    fake.service.reset(Step(code=grpc.StatusCode.RESOURCE_EXHAUSTED, retry_delay_s=0.01))
    assert asyncio.run(run()) == (1, 2)
    assert len(fake.service.calls) == 2


def test_unary_invalid_argument_is_not_retried(fake: FakeServer) -> None:
    fake.service.reset(Step(code=grpc.StatusCode.INVALID_ARGUMENT, violations=(("text", "must not be empty"),)))
    with Client(fake.target, retry=FAST) as client, pytest.raises(TokenstreamError) as info:
        client.tokenize("")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.field_violations[0].field == "text"
    assert len(fake.service.calls) == 1


@both
def test_metadata_request_id_token_traceparent_and_extra(fake: FakeServer, kind: str) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("client-call") as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
        if kind == "sync":
            with Client(fake.target, token="s3cret", metadata={"X-Tenant": "acme"}) as client:
                client.generate_text("x", request_id="req-42", metadata=[("x-extra", "1")])
        else:
            async def run() -> None:
                async with AsyncClient(fake.target, token="s3cret", metadata={"X-Tenant": "acme"}) as client:
                    await client.generate_text("x", request_id="req-42", metadata=[("x-extra", "1")])

            asyncio.run(run())  # the current context is copied into the new loop's task
    (call,) = fake.service.calls
    assert call["x-request-id"] == "req-42"
    assert call["authorization"] == "Bearer s3cret"
    assert call["x-tenant"] == "acme" and call["x-extra"] == "1"
    version, traced, _parent, _flags = call["traceparent"].split("-")
    assert version == "00" and traced == trace_id


def test_a_fresh_request_id_per_call(fake: FakeServer) -> None:
    with Client(fake.target) as client:
        first = client.generate_text("x")
        second = client.generate_text("x")
    ids = [c["x-request-id"] for c in fake.service.calls]
    assert ids == [first.request_id, second.request_id] and ids[0] != ids[1]


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.5, jitter=0.2,
                         max_retry_delay_s=10.0)
    rng = random.Random(7)
    unavailable = TokenstreamError(grpc.StatusCode.UNAVAILABLE, "down")
    for attempt, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5)]:  # exponential, capped
        delay = policy.delay_for(unavailable, attempt, received_response=False, rng=rng)
        assert delay is not None and base * 0.8 <= delay <= base * 1.2
    assert policy.delay_for(unavailable, 5, received_response=False) is None  # bounded attempts
    assert policy.delay_for(unavailable, 1, received_response=True) is None  # never after a response
    busy = TokenstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_delay=1.0)
    for _ in range(20):
        delay = policy.delay_for(busy, 1, received_response=False, rng=rng)
        assert delay is not None and 1.0 <= delay <= 1.2  # never earlier than asked
    too_long = TokenstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", retry_delay=60.0)
    assert policy.delay_for(too_long, 1, received_response=False) is None
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAUTHENTICATED):
        assert policy.delay_for(TokenstreamError(code, "no"), 1, received_response=False) is None
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_channel_options() -> None:
    plain = dict(channel_options("127.0.0.1:50051"))
    assert {k: plain[k] for k, _ in KEEPALIVE_OPTIONS} == {
        "grpc.keepalive_time_ms": 30_000, "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1, "grpc.http2.max_pings_without_data": 0,
    }
    assert "grpc.service_config" not in plain
    dns = dict(channel_options("dns:///tokenstream.default.svc:50051", extra=[("grpc.keepalive_time_ms", 60_000)]))
    assert json.loads(dns["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    assert dns["grpc.keepalive_time_ms"] == 60_000  # extra options override
    tls = dict(channel_options("10.0.0.1:443", TLSConfig(server_name="tokenstream.internal")))
    assert tls["grpc.ssl_target_name_override"] == "tokenstream.internal"
    with pytest.raises(ValueError, match="key"):
        TLSConfig(certificate_chain=b"cert")  # a client certificate needs its key
