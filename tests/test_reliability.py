"""Reliability and security against the real server: fuzzing, admission, slow consumers, faults, storms,
soak, TLS/mTLS and bearer-token auth."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import load_config
from tests import soak
from tests.support.certs import certificates
from tests.support.hooks import StepGate
from tests.support.servers import ServerThread, base_config, started
from tests.test_server import bad_fields
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

GENERATE = "/tokenstream.v1.GenerationService/Generate"


def retry_delay_s(err: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    for detail in status.details if status else ():
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return info.retry_delay.ToMilliseconds() / 1000.0
    return None


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


@pytest.fixture
def small_server(model_dir: Path) -> Iterator[ServerThread]:
    """Two slots, one queue place, and a gate: decode steps happen only when a test permits them."""
    srv = started(base_config(model_dir, max_slots=2, max_queue=1, max_new_tokens_limit=2048, max_backlog=32,
                              max_context=2048), hooks=StepGate(gated=True))
    yield srv
    srv.close()


def gate_of(server: ServerThread) -> StepGate:
    assert server.hooks is not None
    return server.hooks


def long_request(prompt: str = "long", n: int = 2000) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n))


def test_bounded_admission_rejects_at_once_with_retry_info(small_server: ServerThread) -> None:
    with small_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate(long_request(f"long {i}"), timeout=120) for i in range(3)]
        assert small_server.engine.wait_until(lambda s: s.active == 2 and s.waiting == 1, 30)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request(), timeout=60))
        # At once: with the gate closed no slot ever frees, so a queued request would wait out its deadline.
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_s(err.value)
        for c in calls:
            c.cancel()
    assert small_server.engine.wait_until(lambda s: s.active + s.waiting == 0, 30)


def test_deadline_shorter_than_the_expected_wait_is_rejected_at_once(small_server: ServerThread) -> None:
    gate = gate_of(small_server)
    gate.step_delay_s = 0.005  # every step measures 5 ms at least: the engine expects both slots busy for ~10 s
    with small_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        calls = [stub.Generate(long_request(f"busy {i}"), timeout=120) for i in range(2)]
        gate.open()
        assert small_server.engine.wait_until(lambda s: s.active == 2 and s.steps > 20, 60)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request("in a hurry", 20), timeout=0.3))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "estimated time to the first token" in (err.value.details() or "")
        assert small_server.engine.stats().waiting == 0  # it never entered the queue
        for c in calls:
            c.cancel()


def test_a_client_that_stops_reading_is_ended_with_a_clear_reason(small_server: ServerThread) -> None:
    gate_of(small_server).open()
    # No BDP probing: the client's HTTP/2 window stays at its initial size, as a stalled reader's would.
    with grpc.insecure_channel(small_server.target, options=[("grpc.http2.bdp_probe", 0)]) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        req = pb.GenerateRequest(prompt="flood", stopping=pb.StoppingCriteria(max_new_tokens=2000),
                                 response=pb.ResponseOptions(logprobs=True, top_n=10))
        call = stub.Generate(req, timeout=120)  # not read: HTTP/2 flow control stops the server's writes
        assert small_server.engine.wait_until(lambda s: s.active == 0 and s.steps > 50, 120)
        msgs = list(call)
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_ERROR
    assert "stopped reading" in final.error_message
    assert final.usage.completion_tokens < 2000


# -- faults ---------------------------------------------------------------------------------------


def test_a_failing_sequence_ends_alone_while_the_batch_continues(small_server: ServerThread) -> None:
    gate = gate_of(small_server)
    gate.fail("faulty-1", "error_at_5")
    with small_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        req = long_request("healthy", 30)
        gate.open()
        solo = [t.id for m in stub.Generate(req, timeout=60) for t in m.tokens]
        gate.close()
        healthy = stub.Generate(req, timeout=60)
        faulty = stub.Generate(long_request("faulty", 30), metadata=[("x-request-id", "faulty-1")], timeout=60)
        assert small_server.engine.wait_until(lambda s: s.active == 2, 30)  # one batch from the first step
        gate.open()
        faulty_msgs, healthy_msgs = list(faulty), list(healthy)
    assert faulty_msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
    # The exception's type reaches the caller, its text (Paddle's, in production) only the server's log.
    assert faulty_msgs[-1].error_message == "internal error (RuntimeError)"
    assert faulty_msgs[-1].usage.completion_tokens == 5
    assert healthy_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert [t.id for m in healthy_msgs for t in m.tokens] == solo


def test_out_of_memory_in_prefill_is_resource_exhausted(small_server: ServerThread) -> None:
    gate = gate_of(small_server)
    gate.fail("big-1", "prefill_oom")
    gate.open()
    with small_server.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(long_request("big", 5), metadata=[("x-request-id", "big-1")], timeout=30))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_delay_s(err.value)
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
            call = stub.Generate(long_request("after the storm", 60), timeout=60)
            srv.engine.wait_until(lambda s: batch_sizes.append(s.active) or (s.active == 0 and len(batch_sizes) > 5),
                                  30)
            msgs = list(call)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        assert max(batch_sizes) == 1
        assert srv.engine.stats().cache_capacity <= 128
        print(f"\nstorm outcomes: {outcomes}")
    finally:
        srv.close()


# -- soak (short; the 10-minute run is `python -m tests.soak`) -------------------------------------


def test_short_soak_has_no_errors_and_flat_memory(model_dir: Path) -> None:
    """240 requests from 16 streams, however long that takes (bounded by a generous cap): the same work anywhere."""
    server = soak.spawn_server(str(model_dir), ["--max-slots", "8", "--max-queue", "64", "--max-context", "512"])
    try:
        report = asyncio.run(soak.soak(f"127.0.0.1:{server.port}", server.pid, streams=16, seconds=600, max_new=24,
                                       max_requests=240))
    finally:
        server.stop()
    print(f"\nsoak: {report.requests} requests, {report.tokens} tokens, errors {report.errors}, "
          f"rejections {report.admission_rejections}, TTFT {report.ttft_ms}, ITL {report.itl_ms}, "
          f"RSS growth {report.rss_growth_pct}%")
    assert report.other_errors == 0, report.errors
    assert report.requests == report.completed == 240 and report.admission_rejections == 0
    assert report.rss_growth_pct < 5.0, report.rss_mb


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


@pytest.mark.parametrize("protect_reflection", [False, True])
def test_bearer_token_auth(model_dir: Path, tmp_path: Path, protect_reflection: bool) -> None:
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
            assert _generate(ch, metadata=[("authorization", "Bearer beta-token")])[-1].finish_reason
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
            if protect_reflection:
                with pytest.raises(grpc.RpcError):
                    ProtoReflectionDescriptorDatabase(ch).get_services()
            else:
                assert "tokenstream.v1.GenerationService" in ProtoReflectionDescriptorDatabase(ch).get_services()
    finally:
        srv.close()


def test_auth_tokens_come_from_the_environment() -> None:
    config = load_config([], env={"TOKENSTREAM_AUTH_TOKENS": "one, two", "TOKENSTREAM_PORT": "6000"})
    from service.security import load_tokens

    assert load_tokens(config) == (b"one", b"two") and config.port == 6000
