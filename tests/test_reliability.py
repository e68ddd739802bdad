"""Reliability and security against the real server: fuzzing, admission, slow consumers, faults, storms,
soak, TLS/mTLS and bearer-token auth."""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import Config, load_config
from service.engine.api import EngineStats
from tests import soak
from tests.support.certs import certificates
from tests.support.hooks import StepGate
from tests.support.rpc import bad_fields, retry_delay_s
from tests.support.servers import NotServingError, ServerThread, base_config, started, wait_serving
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

GENERATE = "/tokenstream.v1.GenerationService/Generate"


# -- fuzz -----------------------------------------------------------------------------------------

SPECIAL_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 100.0, 1e30, -1.0, float("nan"), float("inf"), float("-inf"), 1e-45]
FLOATS = st.one_of(st.sampled_from(SPECIAL_FLOATS), st.floats(width=32))
U32 = st.one_of(st.integers(0, 12), st.sampled_from([2**31, 2**32 - 1, 65_536]))
SHORT_TEXT = st.one_of(st.sampled_from(["", "hi", "中文", "🙂", "\x00", "stop"]),
                       st.text(st.characters(exclude_categories=("Cs",)), max_size=12))


def mostly(default: object, strategy: st.SearchStrategy) -> st.SearchStrategy:
    """The default three times in four, so that enough whole requests are valid and reach the engine."""
    return st.one_of(st.just(default), st.just(default), st.just(default), strategy)


@st.composite
def big_text(draw: st.DrawFn) -> str:
    """Usually short; sometimes over the 64 KiB prompt limit (built cheaply, not drawn character by character)."""
    text = draw(SHORT_TEXT)
    return text * 8000 + "x" * 70_000 if draw(st.integers(0, 30)) == 0 else text


@st.composite
def generate_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:  # raw bytes: broken wire format, invalid UTF-8 in strings
        return draw(st.one_of(st.binary(max_size=64), st.just(b"\x0a\x02\xff\xfe"), st.just(b"\x12\x03\x0d\xff\xff")))
    sampling = pb.SamplingParams(top_k=draw(U32), top_p=draw(mostly(0.0, FLOATS)),
                                 repetition_penalty=draw(mostly(0.0, FLOATS)))
    if draw(st.booleans()):
        sampling.temperature = draw(mostly(0.7, FLOATS))
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    stop = draw(SHORT_TEXT)
    count = draw(st.sampled_from([0, 0, 0, 0, 0, 0, 1, 2, 9, 3000]))  # huge repeated fields too
    stopping = pb.StoppingCriteria(stop_sequences=[stop + str(i % 3) * (i % 2) for i in range(count)],
                                   min_new_tokens=draw(mostly(0, U32)), include_stop_sequence=draw(st.booleans()))
    if draw(st.booleans()):
        stopping.max_new_tokens = draw(U32)
    if draw(st.booleans()):
        stopping.time_limit_ms = draw(st.one_of(st.just(0), st.just(2**32 - 1), st.integers(1, 5000)))
    req = pb.GenerateRequest(prompt=draw(mostly("hello", big_text())), sampling=sampling, stopping=stopping,
                             response=pb.ResponseOptions(logprobs=draw(st.booleans()), top_n=draw(mostly(0, U32)),
                                                         echo_prompt_tokens=draw(st.booleans())))
    # Huge, but under the 1 MiB receive limit: beyond it gRPC itself answers RESOURCE_EXHAUSTED (tested apart).
    role = draw(st.sampled_from(["user", "", "system", "🙂"]))
    n_messages = draw(st.sampled_from([0] * 7 + [1, 2, 2000]))
    content = draw(SHORT_TEXT) if n_messages > 2 else draw(big_text())
    for i in range(n_messages):
        req.messages.add(role=role, content=content + str(i))
    return req.SerializeToString()


@pytest.fixture(scope="module")
def fuzz_server(model_dir: Path) -> Iterator[ServerThread]:
    srv = started(base_config(model_dir, max_new_tokens=2, max_new_tokens_limit=4, max_request_ms=5000))
    yield srv
    srv.close()


def test_fuzz_10000_requests_get_ok_or_invalid_argument(fuzz_server: ServerThread) -> None:
    counts: dict[str, int] = {}
    with fuzz_server.channel() as ch, ThreadPoolExecutor(8) as pool:
        raw = ch.unary_stream(GENERATE, request_serializer=lambda b: b, response_deserializer=lambda b: b)

        def one(payload: bytes) -> str:
            try:
                for _ in raw(payload, timeout=30):
                    pass
                return "OK"
            except grpc.RpcError as err:
                named = err.code() != grpc.StatusCode.INVALID_ARGUMENT or bool(bad_fields(err))
                return err.code().name if named else "INVALID_ARGUMENT without a field"

        # 200 examples of 50 requests, sent 8 at a time: 10,000 requests.
        @given(batch=st.lists(generate_requests(), min_size=50, max_size=50))
        @settings(max_examples=200, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def send(batch: list[bytes]) -> None:
            for code in pool.map(one, batch):
                counts[code] = counts.get(code, 0) + 1
                assert code in ("OK", "INVALID_ARGUMENT"), code

        send()
        print(f"\nfuzz: {sum(counts.values())} requests: {counts}")
        assert sum(counts.values()) == 10_000
        assert counts.get("OK", 0) > 100 and counts.get("INVALID_ARGUMENT", 0) > 1000  # both paths exercised
        # The server still serves a normal request afterwards.
        msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="still alive"), timeout=30))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert fuzz_server.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, 10)


def test_oversized_messages_and_metadata_are_refused(model_dir: Path) -> None:
    srv = started(base_config(model_dir, max_receive_message_bytes=4096, max_metadata_bytes=1024))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(prompt="x" * 10_000), timeout=10))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(pb.GenerateRequest(prompt="x"), metadata=[("x-big", "y" * 4096)], timeout=10))
            assert err.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
            msgs = list(stub.Generate(pb.GenerateRequest(prompt="fine"), timeout=30))
            assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    finally:
        srv.close()


def test_limits_on_prompt_size_are_configurable(model_dir: Path) -> None:
    srv = started(base_config(model_dir, max_prompt_bytes=100, max_prompt_tokens=5))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            for prompt in ("y" * 101, "one two three four five six seven"):
                with pytest.raises(grpc.RpcError) as err:
                    list(stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=10))
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err.value) == ["prompt"]
    finally:
        srv.close()


# -- overload and admission -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """conftest's gated server here: two slots, one queue place. Requests may last an hour: a slot frees at the latest
    at a request's deadline, so the server's 2-minute cap would bound every wait the engine estimates."""
    return base_config(model_dir, max_slots=2, max_queue=1, max_new_tokens_limit=2048, max_backlog=32,
                       max_context=2048, max_request_ms=3_600_000)


@pytest.fixture
def gated_server(gated_config: Config) -> Iterator[ServerThread]:
    """A fresh one for each test here (conftest's lives for a module): these tests slow the engine's measured steps,
    which a later test's admission estimates would read."""
    srv = started(gated_config, hooks=StepGate(gated=True))
    yield srv
    srv.close()


def long_request(prompt: str = "long", n: int = 2000) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n))


def test_bounded_admission_rejects_at_once_with_retry_info(gated_server: ServerThread) -> None:
    with gated_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate(long_request(f"long {i}"), timeout=120) for i in range(3)]
        assert gated_server.engine.wait_until(lambda s: s.active == 2 and s.waiting == 1, 30)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request(), timeout=60))
        # At once: with the gate closed no slot ever frees, so a queued request would wait out its deadline.
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_s(err.value) == 1.0
        for c in calls:
            c.cancel()
    assert gated_server.engine.wait_until(lambda s: s.active + s.waiting == 0, 30)


REFUSAL_DEADLINE_S = 120.0  # only a hung server would answer later than this
SLOW_STEP_S, MEASURED_STEPS = 0.25, 8


def test_deadline_shorter_than_the_expected_wait_is_rejected_at_once(gated_server: ServerThread,
                                                                    gate: StepGate) -> None:
    """The estimate is made long by construction, not the deadline short: the engine measures steps of 250 ms or
    more, then takes no more, so its wait for a slot stays at ~2,000 tokens of such steps (minutes), while the
    caller allows two minutes, in which any machine answers: the refusal and its message cannot be lost."""
    gate.step_delay_s = SLOW_STEP_S
    engine = gated_server.engine
    with gated_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate(long_request(f"busy {i}"), timeout=3600) for i in range(2)]
        assert engine.wait_until(lambda s: s.active == 2, 60)  # both prefilled: the gate holds decoding only
        steps = engine.stats().steps
        gate.permit(MEASURED_STEPS)
        assert engine.wait_until(lambda s: s.steps == steps + MEASURED_STEPS, 60)
        # The moving average has come most of the way from wherever it was to SLOW_STEP_S or more.
        assert engine.step_seconds >= SLOW_STEP_S * (1 - 0.8**MEASURED_STEPS)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request("in a hurry", 20), timeout=REFUSAL_DEADLINE_S))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        details = err.value.details() or ""
        estimate = re.search(r"estimated time to the first token \((\d+) ms\)", details)
        assert estimate is not None, details
        assert int(estimate.group(1)) > 2 * REFUSAL_DEADLINE_S * 1000
        assert engine.stats().waiting == 0  # it never entered the queue
        for c in calls:
            c.cancel()


def test_a_client_that_stops_reading_is_ended_with_a_clear_reason(gated_server: ServerThread, gate: StepGate) -> None:
    gate.open()
    # No BDP probing: the client's HTTP/2 window stays at its initial size, as a stalled reader's would.
    with grpc.insecure_channel(gated_server.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        req = pb.GenerateRequest(prompt="flood", stopping=pb.StoppingCriteria(max_new_tokens=2000),
                                 response=pb.ResponseOptions(logprobs=True, top_n=10))
        call = stub.Generate(req, timeout=120)  # not read: HTTP/2 flow control stops the server's writes
        assert gated_server.engine.wait_until(lambda s: s.active == 0 and s.steps > 50, 120)
        msgs = list(call)
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_ERROR
    assert "stopped reading" in final.error_message
    assert final.usage.completion_tokens < 2000


# -- faults ---------------------------------------------------------------------------------------


def test_a_failing_sequence_ends_alone_while_the_batch_continues(gated_server: ServerThread, gate: StepGate) -> None:
    gate.fail("faulty-1", "error_at_5")
    with gated_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        req = long_request("healthy", 30)
        gate.open()
        solo = [t.id for m in stub.Generate(req, timeout=60) for t in m.tokens]
        gate.close()
        healthy = stub.Generate(req, timeout=60)
        faulty = stub.Generate(long_request("faulty", 30), metadata=[("x-request-id", "faulty-1")], timeout=60)
        assert gated_server.engine.wait_until(lambda s: s.active == 2, 30)  # one batch from the first step
        gate.open()
        faulty_msgs, healthy_msgs = list(faulty), list(healthy)
    assert faulty_msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
    # The exception's type reaches the caller, its text (Paddle's, in production) only the server's log.
    assert faulty_msgs[-1].error_message == "internal error (RuntimeError)"
    assert faulty_msgs[-1].usage.completion_tokens == 5
    assert healthy_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert [t.id for m in healthy_msgs for t in m.tokens] == solo


def test_out_of_memory_in_prefill_is_resource_exhausted(gated_server: ServerThread, gate: StepGate) -> None:
    gate.fail("big-1", "prefill_oom")
    gate.open()
    with gated_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request("big", 5), metadata=[("x-request-id", "big-1")], timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_s(err.value) == 2.0
        assert "injected" not in (err.value.details() or "")  # the engine's exception text stays in the log
        msgs = list(stub.Generate(long_request("after", 5), timeout=30))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS


def test_production_entry_points_take_no_hooks() -> None:
    """Test seams are reachable only from tests: neither `python -m service` nor its config know of them."""
    import inspect

    from service import __main__ as entry
    from service.config import build_parser

    flags = [flag for action in build_parser()._actions for flag in action.option_strings]
    assert not [f for f in flags if any(word in f for word in ("fault", "hook", "gate", "debug"))], flags
    assert "hooks" not in inspect.signature(entry.main).parameters


def test_cancellation_and_deadline_storm_leaves_nothing_behind(model_dir: Path) -> None:
    srv = started(base_config(model_dir, max_slots=16, max_queue=256, max_new_tokens_limit=2048))
    rng = random.Random(1234)
    plans = [("cancel" if rng.random() < 0.5 else "deadline", rng.randint(0, 40), rng.uniform(0.05, 1.5))
             for _ in range(200)]
    outcomes: dict[str, int] = {}
    lock = threading.Lock()
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)

            def one(i: int) -> None:
                kind, after, deadline = plans[i]
                call = stub.Generate(long_request(f"storm {i}", 500), timeout=deadline if kind == "deadline" else 60)
                outcome = "finished"
                try:
                    for n, msg in enumerate(call):
                        if kind == "cancel" and n >= after:
                            call.cancel()
                        if msg.finish_reason:
                            outcome = pb.FinishReason.Name(msg.finish_reason)
                except grpc.RpcError as err:
                    outcome = err.code().name
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1

            with ThreadPoolExecutor(48) as pool:
                list(pool.map(one, range(200)))
            assert sum(outcomes.values()) == 200
            assert srv.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0 and s.prefilling == 0, 30)
            stats = srv.engine.stats()
            assert stats.used_positions == 0 and stats.kv_fill_ratio == 0.0
            # The next request runs alone: batch of one, and the cache has shrunk back to a small bucket.
            batch_sizes: list[int] = []

            def alone_until_idle(s: EngineStats) -> bool:
                batch_sizes.append(s.active)
                return s.active == 0 and len(batch_sizes) > 5

            call = stub.Generate(long_request("after the storm", 60), timeout=60)
            assert srv.engine.wait_until(alone_until_idle, 60)
            msgs = list(call)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        assert max(batch_sizes) == 1
        assert srv.engine.stats().cache_capacity <= 128
        print(f"\nstorm outcomes: {outcomes}")
    finally:
        srv.close()


# -- soak (short; the 10-minute run is `python -m tests.soak`) -------------------------------------


SOAK_STREAMS, SOAK_REQUESTS, SOAK_WARMUP, SOAK_SAMPLE_EVERY = 16, 400, 100, 4


def test_short_soak_has_no_errors_and_flat_memory(model_dir: Path) -> None:
    """400 requests from 16 streams, however long they take: the same work on any machine. The server's memory is
    sampled every 4 ended requests after a warm-up of 100 and judged per request (tests/soak.py)."""
    server = soak.spawn_server(str(model_dir), ["--max-slots", "8", "--max-queue", "64", "--max-context", "512"])
    try:
        report = asyncio.run(soak.soak(f"127.0.0.1:{server.port}", soak.server_memory(server), streams=SOAK_STREAMS,
                                       max_new=24, max_requests=SOAK_REQUESTS, warmup=SOAK_WARMUP,
                                       sample_every=SOAK_SAMPLE_EVERY))
    finally:
        server.stop()
    print(f"\nsoak: {report.requests} requests in {report.seconds} s, {report.tokens} tokens, errors "
          f"{report.errors}, rejections {report.admission_rejections}, TTFT {report.ttft_ms}, ITL {report.itl_ms}, "
          f"deadline {report.deadline_s} s, memory {report.kib_per_request} KiB/request")
    assert report.errors == {}
    assert report.requests == report.completed == SOAK_REQUESTS and report.admission_rejections == 0
    assert [n for n, _, _ in report.memory_mb] == list(range(SOAK_WARMUP + SOAK_SAMPLE_EVERY, SOAK_REQUESTS + 1,
                                                              SOAK_SAMPLE_EVERY))
    assert report.kib_per_request is not None
    assert report.kib_per_request <= soak.LEAK_KIB_PER_REQUEST, report.memory_mb


def test_soak_growth_is_judged_between_trims() -> None:
    """A fall of the heap hides nothing: growth is the slope within the runs between falls."""
    leak = [(n, 500.0 + n / 4) for n in range(0, 400, 4)]  # 256 KiB a request
    trimmed = [(n, mb - 90.0 * (n >= 200)) for n, mb in leak]  # ...and a 90 MB trim half way
    assert soak.growth_per_request(trimmed) * 1024 == pytest.approx(256.0)
    flat = [(n, 500.0 + 2.0 * (n % 8 == 0) - 90.0 * (n >= 200)) for n in range(0, 400, 4)]
    assert abs(soak.growth_per_request(flat)) * 1024 < 1.0


def test_soak_deadlines_follow_a_slow_machine(model_dir: Path) -> None:
    """Steps of 50 ms or more, as on a slow machine: every request takes longer than the deadline floor given here,
    yet none ends DEADLINE_EXCEEDED, because each deadline after the warm-up follows the slowest warm-up request."""
    floor_s = 0.2  # shorter than any request here: at least 8 steps of 50 ms
    srv = started(base_config(model_dir, max_slots=4, max_queue=16), hooks=StepGate(step_delay_s=0.05))
    try:
        report = asyncio.run(soak.soak(srv.target, soak.ServerMemory(os.getpid()), streams=8, max_new=16,
                                       max_requests=32, warmup=8, sample_every=8, min_deadline_s=floor_s))
    finally:
        srv.close()
    assert report.errors == {} and report.completed == 32
    assert report.slowest_warmup_s > 8 * 0.05
    assert report.deadline_s == soak.DEADLINE_FACTOR * report.slowest_warmup_s > floor_s


def test_soak_fails_when_the_server_hangs_after_the_warmup(model_dir: Path) -> None:
    """A real hang still fails the soak: the engine freezes once the warm-up is over, and every later request ends
    DEADLINE_EXCEEDED at the deadline measured in the warm-up, well before the hang detector's HANG_S."""
    gate = StepGate()
    srv = started(base_config(model_dir, max_slots=4, max_queue=16), hooks=gate)
    try:
        report = asyncio.run(soak.soak(srv.target, soak.ServerMemory(os.getpid()), streams=4, max_new=8,
                                       max_requests=8, warmup=4, min_deadline_s=1.0, after_warmup=gate.freeze))
        assert gate.frozen.wait(60)  # the engine sits in the freeze: nothing after the warm-up was served
    finally:
        srv.close()
    assert report.completed == 4  # the warm-up
    assert report.errors == {"DEADLINE_EXCEEDED": 4}
    assert report.deadline_s == max(1.0, soak.DEADLINE_FACTOR * report.slowest_warmup_s) < soak.HANG_S


class EndsNotServing(health_pb2_grpc.HealthServicer):
    """A health service whose Watch reports NOT_SERVING and ends, as a server that gives up loading might."""

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[
            health_pb2.HealthCheckResponse]:
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)


def test_wait_serving_raises_when_the_watch_ends_without_serving() -> None:
    server = grpc.server(ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(EndsNotServing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(NotServingError, match=r"ended at NOT_SERVING, never SERVING"):
            wait_serving(f"127.0.0.1:{port}", timeout=60)
    finally:
        server.stop(None)


# -- security -------------------------------------------------------------------------------------


def _generate(channel: grpc.Channel, **kw: object) -> list[pb.GenerateResponse]:
    return list(pb_grpc.GenerationServiceStub(channel).Generate(long_request("secure", 3), timeout=10, **kw))


def test_tls_and_mtls(model_dir: Path, tmp_path: Path) -> None:
    f = certificates(tmp_path)
    ca = f["ca.crt"].read_bytes()
    tls = started(base_config(model_dir, tls_cert=str(f["server.crt"]), tls_key=str(f["server.key"])))
    try:
        with grpc.secure_channel(tls.target, grpc.ssl_channel_credentials(root_certificates=ca)) as ch:
            assert _generate(ch)[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        with tls.channel() as plain, pytest.raises(grpc.RpcError) as err:
            _generate(plain)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        tls.close()
    mtls = started(base_config(model_dir, tls_cert=str(f["server.crt"]), tls_key=str(f["server.key"]),
                               tls_client_ca=str(f["ca.crt"])))
    try:
        client = grpc.ssl_channel_credentials(root_certificates=ca, private_key=f["client.key"].read_bytes(),
                                              certificate_chain=f["client.crt"].read_bytes())
        with grpc.secure_channel(mtls.target, client) as ch:
            assert _generate(ch)[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        with grpc.secure_channel(mtls.target, grpc.ssl_channel_credentials(root_certificates=ca)) as ch, \
                pytest.raises(grpc.RpcError) as err:
            _generate(ch)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        mtls.close()


def reflection_without_token(channel: grpc.Channel) -> str:
    """OK when reflection lists the generation service to a caller without a token, else the status code's name."""
    try:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    except grpc.RpcError as err:
        return err.code().name
    return "OK" if "tokenstream.v1.GenerationService" in services else f"OK but lists only {services}"


@pytest.mark.parametrize(("protect_reflection", "reflection"), [(False, "OK"), (True, "UNAUTHENTICATED")])
def test_bearer_token_auth(model_dir: Path, tmp_path: Path, protect_reflection: bool, reflection: str) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha-token\nbeta-token\n")
    srv = started(base_config(model_dir, auth_tokens_file=str(tokens), auth_reflection=protect_reflection))
    try:
        with srv.channel() as ch:
            for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "Basic beta-token")]):
                with pytest.raises(grpc.RpcError) as err:
                    _generate(ch, metadata=metadata)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            final = _generate(ch, metadata=[("authorization", "Bearer beta-token")])[-1]
            assert final.finish_reason == pb.FINISH_REASON_MAX_TOKENS
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            assert reflection_without_token(ch) == reflection
    finally:
        srv.close()


def test_auth_tokens_come_from_the_environment() -> None:
    config = load_config([], env={"TOKENSTREAM_AUTH_TOKENS": "one, two", "TOKENSTREAM_PORT": "6000"})
    from service.security import load_tokens

    assert load_tokens(config) == (b"one", b"two") and config.port == 6000
