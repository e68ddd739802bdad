"""The inference gateway's request headers: the objective's priority orders admission between levels (fair sharing
within one), and the latency targets (x-llm-d-slo-ttft-ms, x-llm-d-slo-tpot-ms) refuse early a request this
server cannot serve in time. Decode steps come from the step gate; the engine's estimates from a step floor the
engine itself measures (StepGate.step_delay_s), so no assertion depends on the machine's speed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from service.config import load_config
from service.engine.delivery import StreamHandle
from service.engine.fairness import FairQueue, holders
from service.engine.sequence import SequenceState
from service.engine.tokenizer import Tokenizer
from service.engine.types import GenerationRequest
from tests.support.hooks import StepGate
from tests.support.http_front import base_url
from tests.support.rpc import error_details
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

OBJECTIVE, FAIRNESS = "x-gateway-inference-objective", "x-llm-d-inference-fairness-id"


def queued(tok: Tokenizer, caller: str, priority: int) -> SequenceState:
    return SequenceState(GenerationRequest(tok.encode("hi"), 50, caller=caller, priority=priority), tok, (), 512, 0,
                         StreamHandle(lambda _: None, None))


def test_a_higher_priority_starts_first_and_callers_share_fairly_within_a_level(model_dir: Path) -> None:
    tok = Tokenizer.from_dir(model_dir)
    queue = FairQueue()
    low = [queued(tok, "a", 0) for _ in range(2)]
    high_b, high_c = queued(tok, "b", 10), queued(tok, "c", 10)
    for s in (*low, high_b, high_c):
        queue.push(s)
    held = holders([])
    held["b"] = 1  # b already holds a slot: c, on the same level, goes first
    order = [queue.pop_next(held) for _ in range(4)]
    assert order == [high_c, high_b, *low]


def test_objective_priorities_are_a_setting_named_in_its_errors() -> None:
    config = load_config(["--objective-priorities", "interactive=10, batch=-1"], env={})
    assert config.priorities == {"interactive": 10, "batch": -1}
    with pytest.raises(SystemExit, match="objective_priorities: 'fast' is not name=integer"):
        load_config(["--objective-priorities", "fast"], env={})


@pytest.fixture
def gateway_server(model_dir: Path) -> Iterator[ServerThread]:
    """One slot, a queue, the loopback as the trusted gateway, and the step gate."""
    srv = started(base_config(model_dir, max_slots=1, max_queue=4, http_port=-1, trusted_proxies="127.0.0.1",
                              caller_key=FAIRNESS, objective_priorities="interactive=10"),
                  hooks=StepGate(gated=True))
    yield srv
    srv.close()


def long_request(prompt: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=500))


@pytest.mark.parametrize("trusted", [True, False])
def test_the_objective_orders_admission_only_from_a_trusted_gateway(model_dir: Path, trusted: bool) -> None:
    """A holds the one slot; X (no objective) queues before Y (objective `interactive`, priority 10). When A ends,
    Y starts first behind the trusted gateway; from an untrusted peer the header means nothing and X, first in
    line, starts first."""
    srv = started(base_config(model_dir, max_slots=1, max_queue=4, trusted_proxies="127.0.0.1" if trusted else "",
                              caller_key=FAIRNESS, objective_priorities="interactive=10"),
                  hooks=StepGate(gated=True))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            a = stub.Generate(long_request("a"), timeout=120, metadata=[(FAIRNESS, "a")])
            assert srv.engine.wait_until(lambda s: s.active == 1, 60)
            x = stub.Generate(long_request("x"), timeout=120, metadata=[(FAIRNESS, "x"), ("x-request-id", "X")])
            assert srv.engine.wait_until(lambda s: s.waiting == 1, 60)
            y = stub.Generate(long_request("y"), timeout=120, metadata=[
                (FAIRNESS, "y"), (OBJECTIVE, "interactive"), ("x-request-id", "Y")])
            assert srv.engine.wait_until(lambda s: s.waiting == 2, 60)
            a.cancel()
            assert srv.engine.wait_until(lambda s: s.active == 1 and s.waiting == 1, 60)
            started_first = srv.engine._active[0].req.request_id  # the one holding the slot now
            x.cancel()
            y.cancel()
        assert started_first == ("Y" if trusted else "X")
    finally:
        srv.close()


def _details(err: grpc.RpcError) -> tuple[str, float | None, list[str]]:
    details = error_details(err)
    return err.details() or "", details.retry_s, list(details.bad_fields)


def test_targets_the_server_cannot_meet_are_refused_before_they_queue(gateway_server: ServerThread) -> None:
    gate = gateway_server.hooks
    assert gate is not None
    gate.step_delay_s = 0.05  # every step measures 50 ms at least: one token takes >= 50 ms here
    with gateway_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        busy = stub.Generate(long_request("busy"), timeout=120)
        gate.open()
        assert gateway_server.engine.wait_until(lambda s: s.active == 1 and s.steps > 5, 60)
        # The slot is taken for ~25 s by the engine's own estimate: a 100 ms first-token target cannot be met.
        for header, value in (("x-llm-d-slo-ttft-ms", "100"), ("x-llm-d-slo-tpot-ms", "10")):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(long_request("hurry"), timeout=60, metadata=[(header, value)]))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            message, retry, _ = _details(err.value)
            assert message.startswith(f"{header}: ") and retry is not None
            assert gateway_server.engine.stats().waiting == 0  # never queued
        # Targets it can meet are admitted (and queue for the slot as any request).
        ok = stub.Generate(long_request("patient"), timeout=120, metadata=[
            ("x-llm-d-slo-ttft-ms", "3600000"), ("x-llm-d-slo-tpot-ms", "60000")])
        assert gateway_server.engine.wait_until(lambda s: s.waiting == 1, 60)
        ok.cancel()
        busy.cancel()


def test_malformed_targets_are_refused_naming_the_header(gateway_server: ServerThread) -> None:
    with gateway_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        for value in ("soon", "0", "-5", "1.5"):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(long_request("x"), timeout=60, metadata=[("x-llm-d-slo-ttft-ms", value)]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _details(err.value)[2] == ["x-llm-d-slo-ttft-ms"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    refused = httpx.post(base_url(gateway_server) + "/v1/chat/completions", json=body, timeout=30,
                         headers={"x-llm-d-slo-tpot-ms": "fast"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "x-llm-d-slo-tpot-ms", refused.text
