"""The real server on port 0 with the real Paddle engine: health, reflection, streams, cancel, deadlines, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.config import Config
from service.server import SERVICE_NAME
from tests.support.hooks import StepGate
from tests.support.loaders import held_loader
from tests.support.rpc import bad_fields, ids_of
from tests.support.servers import ServerThread, base_config, started
from tests.support.tracing import Spans
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc


def health_status(channel: grpc.Channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_not_serving_until_the_model_is_loaded(model_dir: Path) -> None:
    loader = held_loader()  # the real loader, held until the test has looked at health
    srv = ServerThread(base_config(model_dir), loader=loader)
    try:
        with srv.channel() as ch:
            for name in ("", SERVICE_NAME):
                assert health_status(ch, name) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(prompt="hi"), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            loader.release()
            srv.wait_ready()
            for name in ("", SERVICE_NAME):
                assert health_status(ch, name) == health_pb2.HealthCheckResponse.SERVING
    finally:
        loader.release()
        srv.close()


def test_reflection_lists_and_describes_the_service(server: ServerThread) -> None:
    with server.channel() as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        assert SERVICE_NAME in db.get_services()
        assert "grpc.health.v1.Health" in db.get_services()
        desc = db.FindFileContainingSymbol(SERVICE_NAME)
        assert desc.name == "tokenstream/v1/generation.proto"


def test_stream_deltas_concatenate_to_the_decoded_tokens(stub, loaded_model) -> None:
    req = pb.GenerateRequest(prompt="北京是中国的首都。", stopping=pb.StoppingCriteria(max_new_tokens=24))
    msgs = list(stub.Generate(req, timeout=30))
    ids = [t.id for m in msgs for t in m.tokens]
    assert "".join(m.text for m in msgs) == loaded_model.tokenizer.decode(ids)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert final.usage.completion_tokens == 24 == len(ids)
    assert final.usage.prompt_tokens == len(loaded_model.tokenizer.encode("北京是中国的首都。"))
    assert final.timings.time_to_first_token_ms > 0
    assert all(m.text or m is final for m in msgs), "no empty delta before the final message"


def test_greedy_stream_equals_in_process_reference(stub, loaded_model) -> None:
    from tests.reference import NumpyLlama

    prompt = "The capital of France is"
    expected = NumpyLlama(loaded_model.path).greedy(loaded_model.tokenizer.encode(prompt), 10)
    msgs = list(stub.Generate(pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=10)),
                              timeout=30))
    assert [t.id for m in msgs for t in m.tokens][: len(expected)] == expected


def test_client_cancel_stops_decoding(gated_server: ServerThread, gated_stub, gate) -> None:
    engine = gated_server.engine
    call = gated_stub.Generate(pb.GenerateRequest(prompt="count to a million:",
                                                  stopping=pb.StoppingCriteria(max_new_tokens=400)), timeout=60)
    steps = engine.stats().steps
    gate.permit(5)
    assert engine.wait_until(lambda s: s.steps >= steps + 5 and s.active == 1, 30)  # decoding, far from done
    call.cancel()
    assert engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, 10), "engine kept the sequence"
    assert engine.stats().used_positions == 0
    gate.open()
    # Nothing is left to decode: the engine goes on polling its inbox, but takes no decode step.
    steps, iterations = engine.stats().steps, engine.stats().iterations
    assert engine.wait_until(lambda s: s.iterations >= iterations + 2, 10)
    assert engine.stats().steps == steps


STEP_S = 0.4  # an injected engine step: two of them (0.8 s) outweigh the default margin's 50 ms


@pytest.fixture(scope="module")
def slow_server(model_dir: Path) -> Iterator[ServerThread]:
    """The default config, on an engine whose every step takes at least STEP_S (the gate's in_step sleep, which the
    engine measures) and which has measured one decode step: the default deadline margin here is two steps."""
    gate = StepGate(gated=True, step_delay_s=STEP_S)
    srv = started(base_config(model_dir), hooks=gate)
    try:
        gate.permit(1)
        # A long prompt, so that a prompt token looks cheap to admission's first-token estimate.
        warm = pb.GenerateRequest(prompt="word " * 50, stopping=pb.StoppingCriteria(max_new_tokens=2))
        with srv.channel() as ch:
            assert list(pb_grpc.GenerationServiceStub(ch).Generate(warm, timeout=60))[-1].usage.completion_tokens == 2
        yield srv
    finally:
        srv.close()


def two_step_margin(srv: ServerThread) -> StepGate:
    """The server's gate, after checking that the default margin there is two measured steps, not 50 ms."""
    default_ms = Config().deadline_margin_ms
    assert srv.running.state.config.deadline_margin_ms == default_ms and default_ms / 1000 < 2 * STEP_S
    assert srv.engine.step_seconds >= STEP_S
    assert srv.hooks is not None
    return srv.hooks


def test_deadline_ends_the_stream_gracefully_and_drops_the_work(slow_server: ServerThread) -> None:
    """No decode step is permitted, so only the caller's deadline can end the stream: the server ends it first, by
    the default margin, with the final message (a bare DEADLINE_EXCEEDED raises here and fails the test)."""
    two_step_margin(slow_server).close()
    engine = slow_server.engine
    steps = engine.stats().steps
    req = pb.GenerateRequest(prompt="a long story:", stopping=pb.StoppingCriteria(max_new_tokens=400))
    with slow_server.channel() as ch:
        msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=3 * STEP_S))
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert final.usage.completion_tokens == len(ids_of(msgs))
    assert final.usage.prompt_tokens == len(engine.tokenizer.encode("a long story:"))
    assert engine.wait_until(lambda s: s.active == 0 and s.used_positions == 0, 10)
    assert engine.stats().steps == steps  # it ended without a decode step: the deadline did it


def test_the_default_margin_is_two_steps_when_steps_are_slow(slow_server: ServerThread) -> None:
    """With the default deadline margin, a stream whose deadline comes while the engine is inside a 0.4 s step
    still ends with the final message. The margin is max(50 ms, two measured steps): with 50 ms alone the server's
    deadline (0.95 s) falls inside the third step (0.8-1.2 s) and is seen only after the caller's (1.0 s); with two
    steps it is 0.2 s, inside the prefill step, and the final message goes out at its end, 0.6 s early."""
    gate = two_step_margin(slow_server)
    gate.open()
    try:
        req = pb.GenerateRequest(prompt="go", stopping=pb.StoppingCriteria(max_new_tokens=400))
        with slow_server.channel() as ch:
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=2.5 * STEP_S))  # bare: raises
    finally:
        gate.close()
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert final.usage.completion_tokens == len(ids_of(msgs))
    assert final.usage.prompt_tokens == len(slow_server.engine.tokenizer.encode("go"))


def test_time_limit_ends_gracefully_with_partial_text(gated_server: ServerThread, gated_stub, gate: StepGate,
                                                      loaded_model) -> None:
    """Three decode steps are permitted, then none: only the time limit can end the stream. How many of the three
    the engine takes before the limit is the machine's business; the final message must account for each."""
    engine = gated_server.engine
    steps = engine.stats().steps
    req = pb.GenerateRequest(prompt="go", stopping=pb.StoppingCriteria(max_new_tokens=400, time_limit_ms=300))
    gate.permit(3)
    started_at = time.monotonic()
    msgs = list(gated_stub.Generate(req, timeout=30))
    elapsed = time.monotonic() - started_at
    taken = engine.stats().steps - steps  # the stream has ended: no decode step comes after it
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert final.usage.completion_tokens == len(ids_of(msgs)) == 1 + taken  # the prefill's token, one per step
    assert "".join(m.text for m in msgs) == loaded_model.tokenizer.decode(ids_of(msgs))  # the partial text
    assert elapsed >= 0.3  # never before its time limit


def test_server_maximum_request_time(model_dir: Path) -> None:
    srv = started(base_config(model_dir, max_request_ms=200, max_new_tokens_limit=5000),
                  hooks=StepGate(gated=True))
    try:
        with srv.channel() as ch:
            req = pb.GenerateRequest(prompt="go", stopping=pb.StoppingCriteria(max_new_tokens=500))
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=30))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_TIME_LIMIT
        assert msgs[-1].usage.completion_tokens == 1
    finally:
        srv.close()


BAD_REQUESTS = [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=0)), "stopping.max_new_tokens"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=10**6)), "stopping.max_new_tokens"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=512)), "stopping.max_new_tokens"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(time_limit_ms=0)), "stopping.time_limit_ms"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=-0.1)), "sampling.top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "sampling.temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(repetition_penalty=-2)), "sampling.repetition_penalty"),
    (pb.GenerateRequest(prompt="word " * 600), "prompt"),  # longer than the 512-token context
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=[""])), "stopping.stop_sequences[0]"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(max_new_tokens=4, min_new_tokens=5)),
     "stopping.min_new_tokens"),
]


@pytest.mark.parametrize(("request_", "field"), BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_input_names_the_field(stub, request_: pb.GenerateRequest, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_fields(err.value)
    assert field.split("[", maxsplit=1)[0] in err.value.details()


def test_every_bad_field_is_reported_at_once(stub) -> None:
    req = pb.GenerateRequest(prompt="", sampling=pb.SamplingParams(top_p=2.0, temperature=-1))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=10))
    assert {"prompt", "sampling.top_p", "sampling.temperature"} <= set(bad_fields(err.value))


GENERATE_SPAN = f"/{SERVICE_NAME}/Generate"


def test_one_span_per_request_with_child_spans(model_dir: Path) -> None:
    spans = Spans()
    srv = started(base_config(model_dir), tracer_provider=spans.provider)
    try:
        with srv.channel() as ch:
            health_status(ch, "")
            req = pb.GenerateRequest(prompt="trace me", stopping=pb.StoppingCriteria(max_new_tokens=5),
                                     sampling=pb.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=3))
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, metadata=[("x-request-id", "span-1")],
                                                                   timeout=30))
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        (root,) = spans.finished(GENERATE_SPAN)
        assert not [s for s in spans.exporter.get_finished_spans() if "Health" in s.name], "health is not traced"
        attrs = dict(root.attributes or {})
        expected = {
            "gen_ai.operation.name": "text_completion", "gen_ai.request.model": srv.engine.info.name,
            "gen_ai.request.max_tokens": 5, "gen_ai.request.top_k": 40, "gen_ai.request.seed": 3,
            "gen_ai.response.id": "span-1", "gen_ai.usage.input_tokens": msgs[-1].usage.prompt_tokens,
            "gen_ai.usage.output_tokens": 5, "rpc.system": "grpc", "rpc.method": "Generate",
            "rpc.grpc.status_code": 0,
        }
        assert {k: attrs.get(k) for k in expected} == expected
        assert abs(attrs["gen_ai.request.temperature"] - 0.7) < 1e-6 and abs(attrs["gen_ai.request.top_p"] - 0.9) < 1e-6
        assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("max_tokens",)
        assert attrs["tokenstream.time_to_first_token_ms"] > 0
        children = spans.children(root)
        assert set(children) == {"queue", "prefill", "decode"}
        assert children["queue"].end_time <= children["prefill"].start_time + 1
        assert children["prefill"].end_time <= children["decode"].start_time + 1
        assert root.start_time <= children["queue"].start_time and children["decode"].end_time <= root.end_time
    finally:
        srv.close()


def test_a_cancelled_stream_still_gets_usage_and_child_spans(model_dir: Path) -> None:
    spans = Spans()
    gate = StepGate(gated=True)
    srv = started(base_config(model_dir), tracer_provider=spans.provider, hooks=gate)
    try:
        with srv.channel() as ch:
            messages = [pb.ChatMessage(role="user", content="hello")]
            call = pb_grpc.GenerationServiceStub(ch).Generate(
                pb.GenerateRequest(messages=messages, stopping=pb.StoppingCriteria(max_new_tokens=400)), timeout=60)
            steps = srv.engine.stats().steps
            gate.permit(3)
            assert srv.engine.wait_until(lambda s: s.steps >= steps + 3, 30)
            call.cancel()
            (root,) = spans.finished(GENERATE_SPAN)
        attrs = dict(root.attributes or {})
        assert attrs["gen_ai.operation.name"] == "chat"
        assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("cancelled",)
        assert attrs["gen_ai.usage.output_tokens"] == 4  # the prefill's token and three decode steps
        assert attrs["gen_ai.usage.input_tokens"] == len(srv.engine.tokenizer.encode_chat(
            [{"role": "user", "content": "hello"}]))
        assert attrs["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
        assert set(spans.children(root)) == {"queue", "prefill", "decode"}
    finally:
        srv.close()
