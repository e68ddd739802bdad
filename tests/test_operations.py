"""Operations against the real server: health lifecycle and watchdog, SIGTERM drain in a real subprocess,
metrics, trace propagation, request logs, and round-robin across two server processes."""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.server import SERVICE_NAME, load_engine
from tests.conftest import ServerThread, base_config, started
from tests.fake_dns import FakeDNS
from tests.subprocess_server import spawn as spawn_server
from tests.subprocess_server import wait_serving
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
    release = threading.Event()

    def held_loader(config):
        assert release.wait(60)
        return load_engine(config)

    srv = ServerThread(base_config(model_dir), loader=held_loader)
    try:
        with srv.channel() as ch:
            watches = {name: watch(ch, name) for name in ("", SERVICE_NAME)}
            for statuses in watches.values():
                assert next_status(statuses) == NOT_SERVING
            release.set()
            for statuses in watches.values():
                assert next_status(statuses) == SERVING
            srv.call(srv.running.drain(1.0))
            for statuses in watches.values():
                assert next_status(statuses) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        release.set()
        srv.close()


def test_watchdog_fails_liveness_while_the_engine_is_stuck(model_dir: Path) -> None:
    srv = started(base_config(model_dir, debug_faults=True, watchdog_s=0.4))
    try:
        with srv.channel() as ch:
            statuses = watch(ch, "")
            assert next_status(statuses) == SERVING
            stub = pb_grpc.GenerationServiceStub(ch)
            call = stub.Generate(pb.GenerateRequest(prompt="stuck", stopping=pb.StoppingCriteria(max_new_tokens=8)),
                                 metadata=[("x-tokenstream-debug-fault", "stall_ms_3000")], timeout=60)
            assert next_status(statuses) == NOT_SERVING  # health answers while the engine thread is frozen
            assert next_status(statuses) == SERVING  # and recovers once it steps again
            assert list(call)[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    finally:
        srv.close()


def test_health_answers_while_the_engine_decodes(server: ServerThread) -> None:
    with server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate(pb.GenerateRequest(prompt=f"busy {i}", stopping=pb.StoppingCriteria(
            max_new_tokens=300)), timeout=120) for i in range(8)]
        assert server.engine.wait_until(lambda s: s.active == 8, 60)
        health = health_pb2_grpc.HealthStub(ch)
        for _ in range(20):
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
        for c in calls:
            c.cancel()


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
    finally:
        srv.close()
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples['tokenstream_requests_total{finish_reason="max_tokens",grpc_code="OK"}'] == 3
    assert samples['tokenstream_requests_total{finish_reason="none",grpc_code="INVALID_ARGUMENT"}'] == 1
    assert samples["gen_ai_server_time_to_first_token_seconds_count"] == 3
    assert samples["gen_ai_server_time_per_output_token_seconds_count"] == 3
    assert samples["gen_ai_server_request_duration_seconds_count"] == 3
    assert samples["tokenstream_queue_time_seconds_count"] == 3
    assert samples["tokenstream_completion_tokens_total"] == 15
    assert samples["tokenstream_prompt_tokens_total"] > 0
    for gauge in ("tokenstream_active_slots", "tokenstream_queue_depth", "tokenstream_batch_size",
                  "tokenstream_kv_cache_fill_ratio"):
        assert gauge in samples


def test_traceparent_joins_the_callers_trace(model_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = started(base_config(model_dir), tracer_provider=provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        with srv.channel() as ch:
            list(pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(prompt="joined", stopping=pb.StoppingCriteria(max_new_tokens=3)),
                metadata=[("traceparent", f"00-{trace_id}-{parent_id}-01")], timeout=30))
        provider.force_flush()
        (root,) = [s for s in exporter.get_finished_spans() if s.name.endswith("/Generate")]
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
    assert fields["grpc_code"] == "OK" and fields["ttft_ms"] > 0
    assert "secret" not in json.dumps(fields)
    from service.logs import JsonFormatter

    line = json.loads(JsonFormatter().format(records[0]))
    assert line["request_id"] == "req-42" and line["msg"] == "generate finished"


# -- real subprocesses ---------------------------------------------------------------------------


def spawn(model_dir: Path, *args: str) -> tuple[subprocess.Popen, dict]:
    return spawn_server("--model-dir", str(model_dir), "--max-context", "512", *args)


@pytest.fixture
def free_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    yield port


def test_sigterm_drains_streams_with_final_messages_and_exits_zero(model_dir: Path) -> None:
    proc, info = spawn(model_dir, "--port", "0", "--grace-s", "1.5")
    target = f"127.0.0.1:{info['port']}"
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            statuses = watch(ch, "")
            assert next_status(statuses) == SERVING
            short = stub.Generate(pb.GenerateRequest(prompt="short", stopping=pb.StoppingCriteria(
                max_new_tokens=40)), timeout=60)
            long = stub.Generate(pb.GenerateRequest(prompt="long", stopping=pb.StoppingCriteria(
                max_new_tokens=2000)), timeout=60)
            short_first, long_first = next(short), next(long)  # both streams are running
            proc.send_signal(signal.SIGTERM)
            assert next_status(statuses) == NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(prompt="late"), timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            short_msgs = [short_first, *short]
            long_msgs = [long_first, *long]
        assert short_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS  # finished within the grace period
        assert long_msgs[-1].finish_reason == pb.FINISH_REASON_CANCELLED  # ended after it, with a final message
        assert long_msgs[-1].usage.completion_tokens < 2000
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_round_robin_spreads_streams_across_two_processes(model_dir: Path, free_port: int) -> None:
    """Two servers behind one DNS name (as a headless Service gives them); the client balances per stream."""
    procs = [spawn(model_dir, "--host", host, "--port", str(free_port), "--metrics-port", "-1")
             for host in ("127.0.0.1", "127.0.0.2")]
    dns = FakeDNS("tokenstream.test", ["127.0.0.1", "127.0.0.2"])
    try:
        for host in ("127.0.0.1", "127.0.0.2"):
            wait_serving(f"{host}:{free_port}")
        config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
        with grpc.insecure_channel(f"dns://127.0.0.1:{dns.port}/tokenstream.test:{free_port}",
                                   options=[("grpc.service_config", config)]) as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for i in range(12):
                msgs = list(stub.Generate(pb.GenerateRequest(prompt=f"rr {i}", stopping=pb.StoppingCriteria(
                    max_new_tokens=2)), timeout=30, wait_for_ready=True))
                assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        counts = []
        for (_, info), host in zip(procs, ("127.0.0.1", "127.0.0.2"), strict=True):
            body = urllib.request.urlopen(f"http://{host}:{info['metrics_port']}/metrics", timeout=5).read().decode()
            line = next(x for x in body.splitlines() if x.startswith('tokenstream_requests_total{finish_reason="max'))
            counts.append(float(line.rsplit(" ", 1)[1]))
        # Alternating once both connections are up; the first streams may all go to whichever connected first.
        assert sum(counts) == 12 and min(counts) >= 4, counts
    finally:
        dns.close()
        for proc, _ in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            assert proc.wait(timeout=30) == 0
