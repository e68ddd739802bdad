"""The SDK's retries and round-robin against real servers on the real engine (test_client_retry.py has the fakes).

A full server answers RESOURCE_EXHAUSTED with RetryInfo; the SDK waits the delay it names and tries again, with
the same request id, and gets in once room has freed. A channel interceptor sees each attempt: it records when
one was refused, and frees room just before the second one starts, so that the retry finds room whatever the
machine's speed (the engine is held between decode steps, so nothing frees room by itself).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from service.config import Config
from tests.support.fake_dns import FakeDNS
from tests.support.hooks import StepGate
from tests.support.ports import free_port
from tests.support.rpc import ErrorDetails, error_details
from tests.support.servers import ServerThread, base_config, started
from tokenstream_client import AsyncClient, Client, FinishReason, GenerationResult, RetryPolicy
from tokenstream_client.channel import channel_options

LONG = 400  # tokens: the held stream cannot end while the engine is held
QUEUE_FULL_RETRY_S = 1.0  # the RetryInfo delay the server sends with "all slots and the wait queue are full"
ONCE_MORE = RetryPolicy(max_attempts=2)  # one retry: a second refusal fails the test


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """The gated server (tests/conftest.py) with one slot and no queue: a second stream is refused at once."""
    return base_config(model_dir, max_slots=1, max_queue=0)


@dataclass
class AttemptLog:
    """What the channel saw: each attempt's start (time, x-request-id) and each refusal (time, code, message and
    google.rpc.Status details)."""

    before_retry: Callable[[], None]
    starts: list[tuple[float, str]] = field(default_factory=list)
    refusals: list[tuple[float, grpc.StatusCode, str, ErrorDetails]] = field(default_factory=list)

    def started(self, metadata: Any) -> None:
        self.starts.append((time.monotonic(), dict(metadata)["x-request-id"]))
        if len(self.starts) > 1:
            self.before_retry()

    def refused(self, error: grpc.RpcError) -> None:
        self.refusals.append((time.monotonic(), error.code(), error.details(), error_details(error)))


class Observed:
    """A sync call that tells the log when it fails; everything else is the call's own."""

    def __init__(self, call: Any, log: AttemptLog) -> None:
        self._call, self._log = call, log

    def __iter__(self) -> Observed:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as error:
            self._log.refused(error)
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class SyncObserver(grpc.UnaryStreamClientInterceptor):
    def __init__(self, log: AttemptLog) -> None:
        self.log = log

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.log.started(details.metadata)
        return Observed(continuation(details, request), self.log)


class AsyncObserver(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, log: AttemptLog) -> None:
        self.log = log

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        await asyncio.to_thread(self.log.started, details.metadata)  # before_retry blocks: off the loop
        call = await continuation(details, request)

        async def observed() -> AsyncIterator[Any]:
            try:
                async for message in call:
                    yield message
            except grpc.RpcError as error:
                self.log.refused(error)
                raise

        return observed()


def generate_sync(target: str, log: AttemptLog, request_id: str) -> GenerationResult:
    channel = grpc.intercept_channel(grpc.insecure_channel(target, options=channel_options(target)),
                                     SyncObserver(log))
    with channel, Client(target, channel=channel, retry=ONCE_MORE, timeout=60) as client:
        return client.generate_text("x", max_new_tokens=4, request_id=request_id)


def generate_async(target: str, log: AttemptLog, request_id: str) -> GenerationResult:
    async def run() -> GenerationResult:
        channel = grpc.aio.insecure_channel(target, options=channel_options(target), interceptors=[AsyncObserver(log)])
        async with channel, AsyncClient(target, channel=channel, retry=ONCE_MORE, timeout=60) as client:
            return await client.generate_text("x", max_new_tokens=4, request_id=request_id)

    return asyncio.run(run())


GENERATE = {"sync": generate_sync, "async": generate_async}
both = pytest.mark.parametrize("kind", sorted(GENERATE))


@both
def test_a_full_server_is_retried_after_its_retry_info_delay(gated_server: ServerThread, gate: StepGate,
                                                             kind: str) -> None:
    server = gated_server
    with Client(server.target, timeout=60) as holder:
        held = holder.generate("hold the only slot", max_new_tokens=LONG)
        assert len(next(held).token_ids) == 1  # prefilled; no decode step until the gate opens
        assert server.engine.stats().active == 1

        def free_room() -> None:  # the only way the held stream ends: the engine takes no step until open()
            held.close()
            assert server.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, timeout=30)
            gate.open()

        log = AttemptLog(before_retry=free_room)
        result = GENERATE[kind](server.target, log, f"busy-{kind}")

    assert result.finish_reason is FinishReason.MAX_TOKENS and len(result.token_ids) == 4
    assert result.attempts == 2 and [rid for _, rid in log.starts] == [f"busy-{kind}"] * 2  # one logical request
    (refused_at, code, message, details), = log.refusals
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, message
    assert details.kinds == ["RetryInfo"] and details.retry_s == QUEUE_FULL_RETRY_S
    assert log.starts[1][0] - refused_at >= QUEUE_FULL_RETRY_S  # the SDK waited what the server asked, at least


# -- round-robin over the addresses a dns:/// name resolves to ----------------------------------------------------

HOSTS = ("127.0.0.1", "127.0.0.2")
DNS_NAME = "tokenstream.test"
MAX_CALLS = 100  # bounded: both connections are up after a few calls on loopback
ALTERNATING = 8  # calls that must alternate once both servers took one


@pytest.fixture(scope="module")
def two_servers(model_dir: Path) -> Iterator[tuple[list[ServerThread], FakeDNS]]:
    """Two real servers on one port at two loopback addresses, behind one DNS name (a headless Service's shape)."""
    port = free_port()
    servers = [started(base_config(model_dir, host=host, port=port)) for host in HOSTS]
    dns = FakeDNS(DNS_NAME, list(HOSTS))
    yield servers, dns
    dns.close()
    for srv in servers:
        srv.close()


class Picks:
    """Which server took each call, read from both servers' counts of finished calls around it."""

    def __init__(self, servers: list[ServerThread], finished_calls: Callable[..., float]) -> None:
        self.servers, self.finished_calls = servers, finished_calls
        self.order: list[int] = []
        self._before = self.served()

    def served(self) -> list[float]:
        return [self.finished_calls(srv, "max_tokens", "OK") for srv in self.servers]

    def record(self, result: GenerationResult) -> bool:
        """Note the server of the call just finished; whether enough calls alternated since both took one."""
        assert result.finish_reason is FinishReason.MAX_TOKENS
        after = self.served()
        (picked,) = [k for k in range(len(after)) if after[k] > self._before[k]]
        self.order.append(picked)
        self._before = after
        return len(self.settled()) >= ALTERNATING

    def settled(self) -> list[int]:
        """The picks from the first call the second server took."""
        return self.order[self.order.index(1 - self.order[0]):] if len(set(self.order)) == 2 else []


def round_robin_sync(target: str, picks: Picks) -> None:
    with Client(target, timeout=60) as client:
        for i in range(MAX_CALLS):
            if picks.record(client.generate_text(f"rr {i}", max_new_tokens=2)):
                return


def round_robin_async(target: str, picks: Picks) -> None:
    async def run() -> None:
        async with AsyncClient(target, timeout=60) as client:
            for i in range(MAX_CALLS):
                if picks.record(await client.generate_text(f"rr {i}", max_new_tokens=2)):
                    return

    asyncio.run(run())


ROUND_ROBIN = {"sync": round_robin_sync, "async": round_robin_async}


@pytest.mark.parametrize("kind", sorted(ROUND_ROBIN))
def test_dns_targets_alternate_between_the_servers(two_servers: tuple[list[ServerThread], FakeDNS], kind: str,
                                                   finished_calls: Callable[..., float]) -> None:
    servers, dns = two_servers
    picks = Picks(servers, finished_calls)
    ROUND_ROBIN[kind](f"dns://127.0.0.1:{dns.port}/{DNS_NAME}:{servers[0].port}", picks)
    settled = picks.settled()
    assert len(settled) >= ALTERNATING, picks.order  # both servers took calls
    assert all(a != b for a, b in itertools.pairwise(settled)), picks.order  # round robin: per call, in turn
