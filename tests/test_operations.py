"""Operations against the real server: health lifecycle and watchdog, SIGTERM and SIGINT drain in a real subprocess,
metrics, trace propagation, request logs, and round-robin across two server processes."""

from __future__ import annotations

import itertools
import json
import logging
import queue
import signal
import threading
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.server import SERVICE_NAME
from tests.support.fake_dns import FakeDNS
from tests.support.hooks import StepGate
from tests.support.loaders import held_loader
from tests.support.servers import ServerThread, Subprocess, base_config, free_port, started, wait_serving
from tests.support.tracing import Spans
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def watch(channel: grpc.Channel, service: str) -> queue.Queue:
    """Collect a Health.Watch stream's statuses in a queue, from a background thread."""
    out: queue.Queue = queue.Queue()
    call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=120)

    def pump() -> None:
        try:
            for msg in call:
                out.put(msg.status)
        except grpc.RpcError:
            out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def next_status(statuses: queue.Queue, timeout: float = 60) -> int:
    return statuses.get(timeout=timeout)


def test_health_watch_follows_load_serve_and_drain(model_dir: Path) -> None:
    loader = held_loader()
    srv = ServerThread(base_config(model_dir), loader=loader)
    try:
        with srv.channel() as ch:
            watches = {name: watch(ch, name) for name in ("", SERVICE_NAME)}
            for statuses in watches.values():
                assert next_status(statuses) == NOT_SERVING
            loader.release()
            for statuses in watches.values():
                assert next_status(statuses) == SERVING
            srv.call(srv.running.drain(1.0))
            for statuses in watches.values():
                assert next_status(statuses) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        loader.release()
        srv.close()


def test_watchdog_fails_liveness_while_the_engine_is_stuck(model_dir: Path) -> None:
    gate = StepGate()
    srv = started(base_config(model_dir, watchdog_s=0.4), hooks=gate)
    try:
        with srv.channel() as ch:
            statuses = watch(ch, "")
            assert next_status(statuses) == SERVING
            gate.freeze()  # the engine thread blocks at the start of its next iteration, until thawed
            stub = pb_grpc.GenerationServiceStub(ch)
            call = stub.Generate(pb.GenerateRequest(prompt="stuck", stopping=pb.StoppingCriteria(max_new_tokens=8)),
                                 timeout=60)
            assert next_status(statuses) == NOT_SERVING  # health answers while the engine thread is frozen
            assert gate.frozen.is_set()
            gate.thaw()
            assert next_status(statuses) == SERVING  # and recovers once it steps again
            assert list(call)[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    finally:
        srv.close()


class HeldStep(StepGate):
    """A gated StepGate that can also hold the engine inside its next step (in in_step, within the timed forward),
    so that a test acts while a decode step is certainly under way."""

    def __init__(self) -> None:
        super().__init__(gated=True)
        self.hold_next = False
        self.inside = threading.Event()  # the engine is held inside a step
        self._leave = threading.Event()

    def in_step(self) -> None:
        super().in_step()
        if self.hold_next:
            self.hold_next = False
            self.inside.set()
            assert self._leave.wait(60)

    def leave(self) -> None:
        self._leave.set()


def test_health_answers_while_the_engine_decodes(model_dir: Path) -> None:
    """Eight streams decode; the engine is held inside one decode step of all eight while health is asked 20 times.
    The step ends only after the answers: every SERVING came while it was under way."""
    gate = HeldStep()
    srv = started(base_config(model_dir), hooks=gate)
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            calls = [stub.Generate(pb.GenerateRequest(prompt=f"busy {i}", stopping=pb.StoppingCriteria(
                max_new_tokens=300)), timeout=120) for i in range(8)]
            assert srv.engine.wait_until(lambda s: s.active == 8 and s.waiting == 0 and s.prefilling == 0, 60)
            before = srv.engine.stats()
            gate.hold_next = True
            gate.permit(1)
            assert gate.inside.wait(60), "the engine took no decode step"
            health = health_pb2_grpc.HealthStub(ch)
            answers = [health.Check(health_pb2.HealthCheckRequest(), timeout=10).status for _ in range(20)]
            assert srv.engine.stats().steps == before.steps  # the step is still under way
            gate.leave()
            assert srv.engine.wait_until(lambda s: s.steps == before.steps + 1, 30)
            assert answers == [SERVING] * 20
            after = srv.engine.stats()
            assert after.batch_sizes[8] == before.batch_sizes[8] + 1 and after.active == 8  # a step of all eight
            for c in calls:
                c.cancel()
            assert srv.engine.wait_until(lambda s: s.active == 0, 30)
    finally:
        gate.leave()
        srv.close()


def test_metrics_are_exposed_with_genai_names(model_dir: Path) -> None:
    srv = started(base_config(model_dir, metrics_port=-1))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for _ in range(3):
                list(stub.Generate(pb.GenerateRequest(prompt="metrics", stopping=pb.StoppingCriteria(
                    max_new_tokens=5)), timeout=30))
            with pytest.raises(grpc.RpcError):
                list(stub.Generate(pb.GenerateRequest(prompt=""), timeout=30))
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=5).read()
        text = body.decode()
        prompt_tokens = len(srv.engine.tokenizer.encode("metrics"))
    finally:
        srv.close()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    ok = 'caller_class="default",finish_reason="max_tokens",front="grpc",grpc_code="OK"'
    bad = 'caller_class="default",finish_reason="none",front="grpc",grpc_code="INVALID_ARGUMENT"'
    assert samples[f"tokenstream_requests_total{{{ok}}}"] == 3
    assert samples[f"tokenstream_requests_total{{{bad}}}"] == 1
    assert samples['gen_ai_server_time_to_first_token_seconds_count{caller_class="default"}'] == 3
    assert samples["gen_ai_server_time_per_output_token_seconds_count"] == 3
    assert samples["gen_ai_server_request_duration_seconds_count"] == 3
    assert samples["tokenstream_queue_time_seconds_count"] == 3
    assert samples['tokenstream_completion_tokens_total{caller_class="default"}'] == 15
    assert samples["tokenstream_prompt_tokens_total"] == 3 * prompt_tokens
    # Read from the engine at scrape time: every request has ended and freed its slot.
    gauges = ("tokenstream_active_slots", "tokenstream_queue_depth", "tokenstream_kv_cache_fill_ratio")
    assert {g: samples[g] for g in gauges} == dict.fromkeys(gauges, 0.0)
    # Batch size per decode step, not a copy of the active slots: 3 requests of 5 tokens, one at a time, are
    # 3 x 4 decode steps of one row (the first token comes from prefill).
    assert samples["tokenstream_batch_size_count"] == 12 and samples["tokenstream_batch_size_sum"] == 12
    assert samples['tokenstream_batch_size_bucket{le="1.0"}'] == 12


def test_traceparent_joins_the_callers_trace(model_dir: Path) -> None:
    spans = Spans()
    srv = started(base_config(model_dir), tracer_provider=spans.provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        with srv.channel() as ch:
            list(pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(prompt="joined", stopping=pb.StoppingCriteria(max_new_tokens=3)),
                metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")], timeout=30))
        (root,) = spans.finished(f"/{SERVICE_NAME}/Generate")
        assert format(root.context.trace_id, "032x") == trace_id
        assert root.parent is not None and format(root.parent.span_id, "016x") == parent_id
    finally:
        srv.close()


def test_one_json_log_line_per_request_without_text(server: ServerThread, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokenstream.requests")
    with server.channel() as ch:
        list(pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(prompt="secret prompt", stopping=pb.StoppingCriteria(max_new_tokens=4)),
            metadata=[("x-request-id", "req-42")], timeout=30))
    records = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "req-42"]
    assert len(records) == 1
    fields = records[0].fields  # type: ignore[attr-defined]
    assert fields["finish_reason"] == "max_tokens" and fields["completion_tokens"] == 4
    assert fields["code"] == "OK" and fields["ttft_ms"] > 0
    assert "secret" not in json.dumps(fields)
    from service.logs import JsonFormatter

    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-42" and line["msg"] == "generate finished"


def test_every_log_line_of_a_request_carries_its_trace_id(model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokenstream")
    spans, gate = Spans(), StepGate()
    srv = started(base_config(model_dir), tracer_provider=spans.provider, hooks=gate)
    gate.fail("req-7", "error_at_2")  # the engine logs the failed sequence, then the request logs its end
    try:
        with srv.channel() as ch:
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(prompt="fail me", stopping=pb.StoppingCriteria(max_new_tokens=8)),
                metadata=[("x-request-id", "req-7")], timeout=30))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
        (root,) = spans.finished(f"/{SERVICE_NAME}/Generate")
    finally:
        srv.close()
    trace_id = format(root.context.trace_id, "032x")
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "req-7"]
    assert {r.getMessage() for r in lines} == {"sequence failed", "generate finished"}
    assert all(r.fields["trace_id"] == trace_id for r in lines)  # type: ignore[attr-defined]


# -- real subprocesses ---------------------------------------------------------------------------


def spawn(model_dir: Path, *args: str, gated: bool = False) -> Subprocess:
    return Subprocess("--model-dir", str(model_dir), "--max-context", "512", *args, gated=gated)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_streams_with_final_messages_and_exits_zero(model_dir: Path, sig: signal.Signals) -> None:
    """SIGTERM and SIGINT (Ctrl-C) drain alike. The short stream finishes inside the grace period and the long one
    does not, because the test decides how many decode steps the server's engine takes (a gated test entry point),
    not because of the machine's speed."""
    server = spawn(model_dir, "--port", "0", "--grace-s", "2", gated=True)
    target = f"127.0.0.1:{server.port}"
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            statuses = watch(ch, "")
            assert next_status(statuses) == SERVING
            short = stub.Generate(pb.GenerateRequest(prompt="short", stopping=pb.StoppingCriteria(
                max_new_tokens=6)), timeout=60)
            long = stub.Generate(pb.GenerateRequest(prompt="long", stopping=pb.StoppingCriteria(
                max_new_tokens=400)), timeout=60)
            server.await_active(2)
            server.step(4)  # both have 5 of their tokens: the short one is one step from its end
            server.proc.send_signal(sig)
            assert next_status(statuses) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            server.step(1)  # the short stream's last step, inside the grace period; the long one waits on
            short_msgs, long_msgs = list(short), list(long)
        assert short_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS  # finished within the grace period
        assert long_msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED  # ended after it, with a final message
        assert long_msgs[-1].usage.completion_tokens == 6
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.kill()


def served_by(servers: list[Subprocess], hosts: tuple[str, ...]) -> list[float]:
    counts = []
    for server, host in zip(servers, hosts, strict=True):
        body = urllib.request.urlopen(f"http://{host}:{server.info['metrics_port']}/metrics", timeout=5).read()
        counts.append(sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
                          if line.startswith("tokenstream_requests_total{") and 'finish_reason="max_tokens"' in line))
    return counts


def test_round_robin_spreads_streams_across_two_processes(model_dir: Path) -> None:
    """Two servers behind one DNS name (as a headless Service gives them); the client balances per stream.

    Which server took each request is read from both servers' metrics after it, so the assertion is about the
    order of picks (strict alternation once both connections are up), not about how fast they came up.
    """
    port, hosts = free_port(), ("127.0.0.1", "127.0.0.2")
    servers = [spawn(model_dir, "--host", host, "--port", str(port), "--metrics-port", "-1") for host in hosts]
    dns = FakeDNS("tokenstream.test", list(hosts))
    try:
        for host in hosts:
            wait_serving(f"{host}:{port}")
        config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        picks: list[int] = []
        with grpc.insecure_channel(f"dns://127.0.0.1:{dns.port}/tokenstream.test:{port}",
                                   options=[("grpc.service_config", config)]) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            before = served_by(servers, hosts)
            for i in range(40):  # bounded: the second connection is up long before this runs out
                msgs = list(stub.Generate(pb.GenerateRequest(prompt=f"rr {i}", stopping=pb.StoppingCriteria(
                    max_new_tokens=2)), timeout=30, wait_for_ready=True))
                assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
                after = served_by(servers, hosts)
                (picked,) = [k for k in range(2) if after[k] > before[k]]
                picks.append(picked)
                before = after
                if len(set(picks)) == 2 and len(picks) - picks.index(1 - picks[0]) >= 8:
                    break
        # Once each server has taken a stream, picks alternate strictly: round robin, per stream.
        settled = picks[picks.index(1 - picks[0]) :]
        assert len(settled) >= 8, picks
        assert all(a != b for a, b in itertools.pairwise(settled)), picks
    finally:
        dns.close()
        for server in servers:
            server.proc.send_signal(signal.SIGTERM)
        for server in servers:
            assert server.proc.wait(timeout=30) == 0
