"""The HTTP front against the real server and engine, through clients nobody here wrote: the official `openai`
package, curl, and plain http.client where a test must decide when the client leaves.

Everything that must not depend on the machine's speed is paced by the step gate: a held stream is one whose
engine takes no decode step until the test permits it.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import re
import shutil
import signal
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.config import Config
from tests.support.certs import certificates
from tests.support.hooks import StepGate
from tests.support.http_front import (
    DONE,
    RawCall,
    accepted_nodelay,
    base_url,
    client,
    grpc_messages,
    grpc_text,
    model_name,
    sse_payloads,
)
from tests.support.loaders import held_loader
from tests.support.servers import ServerThread, Subprocess, base_config, started, wait_serving
from tests.support.tracing import Spans
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

CHAT = [{"role": "user", "content": "Tell me about 三国演义 🏯"}]


@pytest.fixture(scope="module")
def http_server(model_dir: Path) -> Iterator[ServerThread]:
    srv = started(base_config(model_dir, http_port=-1, metrics_port=-1))
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """Both fronts and metrics on conftest's gated server (conftest's `gated_server` and `gate` take this one)."""
    return base_config(model_dir, http_port=-1, metrics_port=-1)


@pytest.fixture(scope="module")
def smollm2_http() -> Iterator[ServerThread]:
    """The real pretrained SmolLM2-135M-Instruct, where what a parameter does to real text matters."""
    srv = started(base_config("default", http_port=-1, max_context=1024, max_new_tokens=128))
    yield srv
    srv.close()


# -- the openai SDK ------------------------------------------------------------------------------------------------


def test_sdk_streams_a_chat_answer_equal_to_the_grpc_one(http_server: ServerThread) -> None:
    sdk = client(http_server)
    stream = sdk.chat.completions.create(model=model_name(http_server), messages=CHAT, max_tokens=12, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    *content, finish, usage = chunks
    assert content[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in [*content, finish])
    assert all(c.usage is None for c in [*content, finish]) and all(c.id == chunks[0].id for c in chunks)
    assert finish.choices[0].finish_reason == "length"
    assert finish.choices[0].model_extra["tokenstream"]["finish_reason"] == "max_tokens"
    assert usage.choices == [] and usage.usage is not None
    grpc_answer, final = grpc_text(http_server, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in CHAT], stopping=pb.StoppingCriteria(max_new_tokens=12)))
    assert text == grpc_answer and text  # greedy on both fronts: the same engine request
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (final.usage.prompt_tokens, 12)
    assert usage.usage.total_tokens == final.usage.prompt_tokens + 12


def test_sdk_non_streaming_chat_and_completions(http_server: ServerThread) -> None:
    sdk, name = client(http_server), model_name(http_server)
    chat = sdk.chat.completions.create(model=name, messages=CHAT, max_tokens=10, temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(
        model=name, messages=CHAT, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == streamed and chat.usage is not None
    assert chat.usage.completion_tokens == 10 and chat.choices[0].finish_reason == "length"

    done = sdk.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2)
    grpc_answer, final = grpc_text(http_server, pb.GenerateRequest(
        prompt="Once upon a time", stopping=pb.StoppingCriteria(max_new_tokens=8)))
    choice = done.choices[0]
    assert done.object == "text_completion" and choice.text == grpc_answer
    assert done.usage is not None and done.usage.prompt_tokens == final.usage.prompt_tokens
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert all(len(top) <= 2 and token in top for token, top in zip(lp.tokens, lp.top_logprobs, strict=True))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0

    pieces = list(sdk.completions.create(model=name, prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True))
    assert "".join(p.choices[0].text for p in pieces) == grpc_answer
    assert pieces[-1].choices[0].finish_reason == "length"


def test_sdk_chat_logprobs(http_server: ServerThread) -> None:
    out = client(http_server).chat.completions.create(model=model_name(http_server), messages=CHAT, max_tokens=6,
                                                      temperature=0, logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs))  # greedy: the best one
    raw = [bytes(entry.bytes) for entry in content if entry.bytes is not None]
    assert len(raw) == 6 and b"".join(raw) == (out.choices[0].message.content or "").encode()


def test_sampling_parameters_reach_the_engine(http_server: ServerThread) -> None:
    """temperature, top_p and seed map onto the engine request: the same sample as gRPC with the same values."""
    answer = client(http_server).chat.completions.create(
        model=model_name(http_server), messages=CHAT, max_tokens=10, temperature=0.9, top_p=0.8, seed=1234)
    grpc_answer, final = grpc_text(http_server, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in CHAT], stopping=pb.StoppingCriteria(max_new_tokens=10),
        sampling=pb.SamplingParams(temperature=0.9, top_p=0.8, seed=1234)))
    assert answer.choices[0].message.content == grpc_answer
    assert answer.choices[0].model_extra["tokenstream"]["seed"] == final.seed == 1234


def test_stop_sequences_end_with_stop(http_server: ServerThread) -> None:
    sdk, name = client(http_server), model_name(http_server)
    full = sdk.completions.create(model=name, prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"no usable stop sequence in {full!r}"
    ended = sdk.completions.create(model=name, prompt="Hello", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert ended.finish_reason == "stop" and ended.text == full[: full.index(stop)]
    extension = ended.model_extra["tokenstream"]
    assert extension["finish_reason"] == "stop_sequence" and extension["stop_sequence"] == stop


def test_models(http_server: ServerThread) -> None:
    sdk, name = client(http_server), model_name(http_server)
    assert [m.id for m in sdk.models.list()] == [name]
    assert sdk.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")


# -- vLLM's top_k, repetition_penalty and min_tokens; continuous usage; the sampling defaults ------------------------

VLLM_EXTRAS = ("top_k", "repetition_penalty", "min_tokens")  # not in the openai SDK's signature: sent as extra_body


def chat_choice(server: ServerThread, messages: list[dict[str, str]] = CHAT, max_tokens: int = 12,
                **params: Any) -> Any:
    """One non-streamed chat answer's choice, through the openai SDK, with vLLM's extensions where given."""
    extra = {name: params.pop(name) for name in VLLM_EXTRAS if name in params}
    return client(server).chat.completions.create(model=model_name(server), messages=messages, max_tokens=max_tokens,
                                                  extra_body=extra, **params).choices[0]


def in_top(entry: Any) -> bool:
    """Whether a logprobs entry's token is among the model's most likely ones at its position (its top_logprobs)."""
    return bool(entry.logprob >= min(t.logprob for t in entry.top_logprobs))


def test_top_k_keeps_only_the_k_most_likely_tokens(http_server: ServerThread) -> None:
    """At a temperature so hot that an unlimited sample lands anywhere in the vocabulary, top_k=1 is greedy and
    top_k=5 keeps every token among the model's five most likely (the logprobs are the model's own)."""
    hot = {"temperature": 5.0, "seed": 7, "logprobs": True, "top_logprobs": 5}
    greedy = chat_choice(http_server, temperature=0).message.content
    assert chat_choice(http_server, **hot, top_k=1).message.content == greedy
    limited, unlimited = chat_choice(http_server, **hot, top_k=5), chat_choice(http_server, **hot)
    assert [in_top(e) for e in limited.logprobs.content] == [True] * 12
    assert [in_top(e) for e in unlimited.logprobs.content] == [False] * 12
    grpc_answer, _ = grpc_text(http_server, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in CHAT], stopping=pb.StoppingCriteria(max_new_tokens=12),
        sampling=pb.SamplingParams(temperature=5.0, top_k=5, seed=7)))
    assert limited.message.content == grpc_answer != greedy


def repeats(prompt_ids: Sequence[int], ids: Sequence[int]) -> int:
    """How many generated tokens repeat one already in the prompt or the output."""
    seen, count = set(prompt_ids), 0
    for token in ids:
        count += token in seen
        seen.add(token)
    return count


def test_repetition_penalty_is_the_grpc_penalty_and_repeats_less(smollm2_http: ServerThread) -> None:
    prompt, penalty = "1, 1, 1, 1, 1, 1,", 1.5
    sdk, name = client(smollm2_http), model_name(smollm2_http)
    plain, penalized = (sdk.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0,
                                               extra_body=extra).choices[0].text
                        for extra in ({}, {"repetition_penalty": penalty}))

    def grpc_ids(sampling: pb.SamplingParams) -> tuple[str, list[int], list[int]]:
        msgs = grpc_messages(smollm2_http, pb.GenerateRequest(
            prompt=prompt, sampling=sampling, stopping=pb.StoppingCriteria(max_new_tokens=12),
            response=pb.ResponseOptions(echo_prompt_tokens=True)))
        return "".join(m.text for m in msgs), list(msgs[0].prompt_token_ids), [t.id for m in msgs for t in m.tokens]

    grpc_penalized, prompt_ids, penalized_ids = grpc_ids(pb.SamplingParams(repetition_penalty=penalty))
    grpc_plain, _, plain_ids = grpc_ids(pb.SamplingParams())
    assert (penalized, plain) == (grpc_penalized, grpc_plain)  # greedy, the same engine request on both fronts
    assert penalized != plain
    assert repeats(prompt_ids, penalized_ids) < repeats(prompt_ids, plain_ids) == 12, (plain, penalized)


def test_min_tokens_keeps_the_end_of_sequence_away(smollm2_http: ServerThread) -> None:
    """A question SmolLM2 answers in a word ends with EOS at once; min_tokens suppresses EOS until that many tokens
    came, and the answer goes on from the same start (greedy), as on gRPC with min_new_tokens."""
    ask, least = [{"role": "user", "content": "Say only the word yes."}], 8
    short = chat_choice(smollm2_http, ask, max_tokens=16, temperature=0)
    assert short.model_extra["tokenstream"]["finish_reason"] == "eos_token" and short.finish_reason == "stop"
    kept = client(smollm2_http).chat.completions.create(
        model=model_name(smollm2_http), messages=ask, max_tokens=16, temperature=0, extra_body={"min_tokens": least})
    assert kept.usage is not None and kept.usage.completion_tokens >= least
    text = kept.choices[0].message.content or ""
    assert text.startswith(short.message.content) and len(text) > len(short.message.content)
    grpc_answer, _ = grpc_text(smollm2_http, pb.GenerateRequest(
        messages=[pb.ChatMessage(**m) for m in ask], stopping=pb.StoppingCriteria(max_new_tokens=16,
                                                                                  min_new_tokens=least)))
    assert text == grpc_answer


def test_continuous_usage_stats_count_the_tokens_so_far_in_every_chunk(gated_server: ServerThread,
                                                                        gate: StepGate) -> None:
    """One decode step at a time, so chunk k carries exactly k tokens; without include_usage there is no separate
    usage chunk after the last."""
    _, prefilled = grpc_text(gated_server, pb.GenerateRequest(  # one token: prefill's, no decode step needed
        messages=[pb.ChatMessage(**m) for m in CHAT], stopping=pb.StoppingCriteria(max_new_tokens=1)))
    prompt_tokens = prefilled.usage.prompt_tokens
    call = RawCall(gated_server.running.http_port, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"continuous_usage_stats": True}})
    events = call.payloads()
    try:
        chunks = [next(events)]  # prefill's token
        for _ in range(3):
            gate.permit(1)
            chunks.append(next(events))
        rest = list(events)
    finally:
        call.close()
    counts = [(c["usage"]["prompt_tokens"], c["usage"]["completion_tokens"], c["usage"]["total_tokens"])
              for c in chunks]
    assert counts == [(prompt_tokens, k, prompt_tokens + k) for k in range(1, 5)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and rest == [DONE]


RECOMMENDED = {"temperature": 1.5, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3}
UNRECOMMENDED = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}  # OpenAI's, no limits


def recommending_model(model_dir: Path, into: Path) -> Path:
    """The suite's model, with a generation_config.json that recommends RECOMMENDED."""
    for path in model_dir.iterdir():
        if path.name != "generation_config.json":
            (into / path.name).symlink_to(path)
    config = json.loads((model_dir / "generation_config.json").read_text())
    (into / "generation_config.json").write_text(json.dumps({**config, "do_sample": True, **RECOMMENDED}))
    return into


def sampled(server: ServerThread, **params: Any) -> tuple[str, int | None]:
    """A chat answer's text and the seed it sampled with: the server's own pick when the request sets none, None
    when it decoded greedily."""
    choice = chat_choice(server, **params)
    return choice.message.content, choice.model_extra["tokenstream"].get("seed")


def test_unset_sampling_takes_the_models_recommendation(model_dir: Path, tmp_path: Path) -> None:
    srv = started(base_config(recommending_model(model_dir, tmp_path), http_port=-1))
    try:
        with srv.channel() as ch:
            info = pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        advertised = info.recommended_sampling
        assert {name: getattr(advertised, name) for name in RECOMMENDED} == pytest.approx(RECOMMENDED)
        text, seed = sampled(srv)  # no sampling parameter at all
        assert sampled(srv, **RECOMMENDED, seed=seed) == (text, seed)
        for name, value in UNRECOMMENDED.items():  # each recommended value is in effect: without it, another sample
            assert sampled(srv, **{**RECOMMENDED, name: value}, seed=seed)[0] != text, name
        assert chat_choice(srv, temperature=0).message.content != text
    finally:
        srv.close()


def test_unset_sampling_is_openai_temperature_1_without_a_recommendation(http_server: ServerThread) -> None:
    with http_server.channel() as ch:
        info = pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    assert not info.HasField("recommended_sampling")  # the suite's model recommends nothing
    text, seed = sampled(http_server)
    assert sampled(http_server, temperature=1.0, seed=seed) == (text, seed)
    assert sampled(http_server, temperature=0.5, seed=seed)[0] != text
    assert chat_choice(http_server, temperature=0).message.content != text


# -- errors --------------------------------------------------------------------------------------------------------

# (what the chat request changes, the HTTP status, the OpenAI `param` the error names)
CHAT_ERRORS = [
    ({"temperature": -1}, 400, "temperature"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10**12}, 400, "max_tokens"),
    ({"max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ({"stop": ["ok", ""]}, 400, "stop"),
    ({"stop": [1]}, 400, "stop"),
    ({"stop": ["s"] * 9}, 400, "stop"),
    ({"seed": -1}, 400, "seed"),
    ({"logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"n": 2}, 400, "n"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"guided_json": {}}, 400, "guided_json"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "", "content": "hi"}]}, 400, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages"),
    ({"messages": [{"role": "user", "content": "x" * 70_000}]}, 400, "messages"),
    ({"model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize(("change", "status", "param"), CHAT_ERRORS, ids=[json.dumps(c[0])[:40] for c in CHAT_ERRORS])
def test_bad_fields_are_openai_errors_naming_the_param(http_server: ServerThread, change: dict[str, Any],
                                                       status: int, param: str) -> None:
    body = {"model": model_name(http_server), "messages": CHAT, "max_tokens": 4, **change}
    response = httpx.post(base_url(http_server) + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), error
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")


def test_a_malformed_request_id_is_replaced_by_a_fresh_one(http_server: ServerThread) -> None:
    url = base_url(http_server) + "/v1/chat/completions"
    kept = httpx.post(url, json={"messages": CHAT, "max_tokens": 2}, headers={"x-request-id": "req-7"}, timeout=60)
    assert kept.status_code == 200 and kept.headers["x-request-id"] == "req-7"
    response = httpx.post(url, json={"messages": CHAT, "max_tokens": 2}, headers={"x-request-id": "x" * 129},
                          timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] != "x" * 129 and len(response.headers["x-request-id"]) == 32


def test_the_sdk_raises_typed_errors_with_the_param(http_server: ServerThread) -> None:
    sdk, name = client(http_server), model_name(http_server)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model=name, messages=CHAT, max_tokens=4, temperature=500)
    assert bad.value.status_code == 400 and bad.value.param == "temperature" and bad.value.code == "invalid_argument"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.completions.create(model=name, prompt="", max_tokens=4)
    assert bad.value.param == "prompt"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.chat.completions.create(model="gpt-4", messages=CHAT)
    assert missing.value.param == "model"


def test_bodies_that_are_not_json_objects(http_server: ServerThread) -> None:
    url = base_url(http_server) + "/v1/completions"
    for content in (b"{not json", b"[1, 2]", "\xff".encode("latin-1")):
        response = httpx.post(url, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] is None
        assert "request body" in response.json()["error"]["message"]
    too_big = httpx.post(url, content=b" " * 2_000_000, headers={"content-type": "application/json"}, timeout=30)
    assert too_big.status_code == 400 and "larger than" in too_big.json()["error"]["message"]
    assert httpx.get(base_url(http_server) + "/v1/nothing", timeout=30).json()["error"]["type"] == "not_found_error"
    assert httpx.get(url, timeout=30).status_code == 405


# -- curl ----------------------------------------------------------------------------------------------------------


def test_curl_shows_the_sse_frames(http_server: ServerThread) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"messages": CHAT, "max_tokens": 5, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    out = subprocess.run([curl, "-N", "-sS", "--fail-with-body", base_url(http_server) + "/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.endswith("data: [DONE]\n\n")
    events = out.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = list(sse_payloads(events))
    assert payloads[-1] == DONE and payloads[-2]["usage"]["completion_tokens"] == 5
    assert {p["object"] for p in payloads[:-1]} == {"chat.completion.chunk"}


# -- disconnects, overload, loading and draining ----------------------------------------------------------------------


def held_stream(server: ServerThread, front: str) -> Any:
    """A stream holding a slot, with its first token delivered; the returned function makes its client leave."""
    if front == "http":
        call = RawCall(server.running.http_port, "/v1/chat/completions",
                       {"messages": CHAT, "max_tokens": 400, "temperature": 0, "stream": True})
        first = next(call.payloads())
        assert first["choices"][0]["delta"]["role"] == "assistant"
        return call.close
    channel = server.channel()
    stream = pb_grpc.GenerationServiceStub(channel).Generate(
        pb.GenerateRequest(prompt="held", stopping=pb.StoppingCriteria(max_new_tokens=400)), timeout=60)
    assert len(next(stream).tokens) == 1  # prefill's token

    def leave() -> None:
        stream.cancel()
        channel.close()

    return leave


@pytest.mark.parametrize("front", ["http", "grpc"])
def test_a_client_that_leaves_frees_its_slot_without_another_step(gated_server: ServerThread, gate: StepGate,
                                                                   front: str) -> None:
    engine = gated_server.engine
    leave = held_stream(gated_server, front)
    assert engine.wait_until(lambda s: s.active == 1, 30)
    steps = engine.stats().steps
    leave()
    # The gate permits no step, so the slot is freed by the cancellation itself, not by the stream running out.
    assert engine.wait_until(lambda s: s.active == 0, 30)
    assert engine.stats().steps == steps
    assert gated_server.call(_active_streams(gated_server)) == 0  # read on the loop, where streams are counted


def test_a_non_streaming_client_that_leaves_frees_its_slot(gated_server: ServerThread, gate: StepGate) -> None:
    call = RawCall(gated_server.running.http_port, "/v1/completions",
                   {"prompt": "wait for me", "max_tokens": 400, "temperature": 0})
    assert gated_server.engine.wait_until(lambda s: s.active == 1, 30)
    call.close()
    assert gated_server.engine.wait_until(lambda s: s.active == 0, 30)


def test_a_client_that_leaves_while_queued_is_dropped(model_dir: Path) -> None:
    srv = started(base_config(model_dir, http_port=-1, max_slots=1, max_queue=2), hooks=StepGate(gated=True))
    try:
        running = RawCall(srv.running.http_port, "/v1/completions",
                          {"prompt": "first", "max_tokens": 400, "stream": True})
        next(running.payloads())
        queued = RawCall(srv.running.http_port, "/v1/completions", {"prompt": "second", "max_tokens": 400})
        assert srv.engine.wait_until(lambda s: s.active == 1 and s.waiting == 1, 30)
        queued.close()
        assert srv.engine.wait_until(lambda s: s.waiting == 0, 30)
        running.close()
        assert srv.engine.wait_until(lambda s: s.active == 0, 30)
    finally:
        srv.close()


def test_overload_is_429_with_retry_after(model_dir: Path) -> None:
    srv = started(base_config(model_dir, http_port=-1, max_slots=1, max_queue=1), hooks=StepGate(gated=True))
    calls = []
    try:
        for i in range(2):
            calls.append(RawCall(srv.running.http_port, "/v1/completions",
                                 {"prompt": f"busy {i}", "max_tokens": 400, "stream": True}))
        assert srv.engine.wait_until(lambda s: s.active == 1 and s.waiting == 1, 30)
        with pytest.raises(openai.RateLimitError) as err:
            client(srv).completions.create(model=model_name(srv), prompt="one more", max_tokens=4)
        response = err.value.response
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert err.value.type == "rate_limit_error" and err.value.code == "resource_exhausted"
        assert "retry later" in err.value.message
    finally:
        for call in calls:
            call.close()
        srv.close()


def test_a_client_that_stops_reading_is_ended_with_a_clear_reason(model_dir: Path) -> None:
    """The engine's slow-reader ending applies to HTTP too: once the socket and uvicorn's write buffer are full,
    the front stops taking chunks, and the engine ends the stream when its backlog passes max_backlog."""
    srv = started(base_config(model_dir, http_port=-1, max_context=4096, max_backlog=8))
    try:
        call = RawCall(srv.running.http_port, "/v1/chat/completions", receive_buffer=4096, body={
            "messages": CHAT, "max_tokens": 2048, "temperature": 0, "stream": True, "logprobs": True,
            "top_logprobs": 10})  # about 3 kB a token: far more than the socket buffers hold
        assert srv.engine.wait_until(lambda s: s.active == 0 and s.steps > 20, 120)
        payloads = list(call.payloads())
        call.close()
    finally:
        srv.close()
    assert payloads[-1] == DONE and "stopped reading" in payloads[-2]["error"]["message"]
    assert payloads[-2]["error"]["type"] == "server_error"
    assert 1 < len(payloads) - 2 < 2048  # it was ended early, after what the buffers held


def test_503_while_the_model_loads(model_dir: Path) -> None:
    loader = held_loader()  # the real loader, held until the test has asked
    srv = ServerThread(base_config(model_dir, http_port=-1), loader=loader)
    try:
        sdk = client(srv)
        with pytest.raises(openai.InternalServerError) as err:
            sdk.chat.completions.create(model="any", messages=CHAT)
        assert err.value.status_code == 503 and err.value.type == "service_unavailable_error"
        assert "loading" in err.value.message
        assert httpx.get(base_url(srv) + "/v1/models", timeout=30).status_code == 503
        assert httpx.get(base_url(srv) + "/", timeout=30).status_code == 200  # the page itself is static
        loader.release()
        srv.wait_ready()
        answer = sdk.chat.completions.create(model=model_name(srv), messages=CHAT, max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
    finally:
        loader.release()
        srv.close()


def test_drain_ends_http_streams_with_a_final_chunk_and_refuses_new_ones(model_dir: Path) -> None:
    srv = started(base_config(model_dir, http_port=-1), hooks=StepGate(gated=True))
    try:
        call = RawCall(srv.running.http_port, "/v1/chat/completions",
                       {"messages": CHAT, "max_tokens": 400, "stream": True,
                        "stream_options": {"include_usage": True}})
        events = call.payloads()
        next(events)
        srv.call(srv.running.drain(0.0))  # no grace: the held stream is cancelled with a final message
        rest = list(events)
        assert rest[-1] == DONE
        usage, final = rest[-2], rest[-3]
        assert final["choices"][0]["finish_reason"] == "length"
        assert final["choices"][0]["tokenstream"]["finish_reason"] == "cancelled"
        assert usage["usage"]["completion_tokens"] == 1
        with pytest.raises(openai.InternalServerError) as err:
            client(srv).chat.completions.create(model=model_name(srv), messages=CHAT, max_tokens=2)
        assert err.value.status_code == 503 and "shutting down" in err.value.message
    finally:
        srv.close()


def test_sigterm_drains_both_fronts_and_exits_zero(model_dir: Path) -> None:
    server = Subprocess("--model-dir", str(model_dir), "--max-context", "512", "--port", "0", "--http-port", "-1",
                        "--grace-s", "60", gated=True)
    try:
        http_port = int(server.info["http_port"])
        wait_serving(f"127.0.0.1:{server.port}")
        http_call = RawCall(http_port, "/v1/completions", {"prompt": "short", "max_tokens": 4, "stream": True})
        http_events = http_call.payloads()
        next(http_events)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            grpc_call = pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(
                prompt="short", stopping=pb.StoppingCriteria(max_new_tokens=4)), timeout=60)
            server.await_active(2)
            statuses = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            server.proc.send_signal(signal.SIGTERM)
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING  # draining from here on
            late = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json={"prompt": "late"}, timeout=30)
            assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
            server.step(3)  # both streams' last three tokens, inside the grace period
            grpc_msgs = list(grpc_call)
        http_rest = list(http_events)
        assert grpc_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        assert http_rest[-1] == DONE and http_rest[-2]["choices"][0]["tokenstream"]["finish_reason"] == "max_tokens"
        http_call.close()
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.kill()


# -- auth, TLS, telemetry, the page ---------------------------------------------------------------------------------


def test_the_same_bearer_tokens_apply(model_dir: Path) -> None:
    srv = started(base_config(model_dir, http_port=-1, auth_tokens="s3cret,other"))
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            client(srv, api_key="wrong").chat.completions.create(model=model_name(srv), messages=CHAT, max_tokens=2)
        assert err.value.status_code == 401 and err.value.response.headers["www-authenticate"] == "Bearer"
        assert httpx.get(base_url(srv) + "/v1/models", timeout=30).status_code == 401
        answer = client(srv, api_key="other").chat.completions.create(model=model_name(srv), messages=CHAT,
                                                                      max_tokens=2)
        assert answer.usage is not None and answer.usage.completion_tokens == 2
        assert httpx.get(base_url(srv) + "/", timeout=30).status_code == 200  # the page asks for the key itself
    finally:
        srv.close()


def test_the_same_tls_and_mtls(model_dir: Path, tmp_path: Path) -> None:
    files = certificates(tmp_path)
    srv = started(base_config(model_dir, http_port=-1, tls_cert=str(files["server.crt"]),
                              tls_key=str(files["server.key"]), tls_client_ca=str(files["ca.crt"])))
    try:
        context = ssl.create_default_context(cafile=str(files["ca.crt"]))
        context.load_cert_chain(str(files["client.crt"]), str(files["client.key"]))
        with httpx.Client(verify=context) as http:
            sdk = openai.OpenAI(base_url=base_url(srv, "https") + "/v1", api_key="unused", http_client=http,
                                max_retries=0)
            answer = sdk.chat.completions.create(model=model_name(srv), messages=CHAT, max_tokens=2)
            assert answer.usage is not None and answer.usage.completion_tokens == 2
        anonymous = ssl.create_default_context(cafile=str(files["ca.crt"]))
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)), \
                httpx.Client(verify=anonymous) as http:
            http.get(base_url(srv, "https") + "/v1/models")  # no client certificate: the handshake fails
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(base_url(srv) + "/v1/models", timeout=10)  # plain HTTP to a TLS port
    finally:
        srv.close()


def test_http_requests_get_spans_metrics_and_log_lines(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tokenstream.requests")
    spans = Spans()
    srv = started(base_config(model_dir, http_port=-1, metrics_port=-1, caller_classes="batch"),
                  tracer_provider=spans.provider)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        headers = {"traceparent": f"00-{trace_id}-{parent_id}-01", "x-request-id": "http-req-1",
                   "x-caller-class": "batch"}
        response = httpx.post(base_url(srv) + "/v1/chat/completions", headers=headers, timeout=60,
                              json={"messages": CHAT, "max_tokens": 3, "stream": True})
        assert response.headers["x-request-id"] == "http-req-1" and response.text.endswith("data: [DONE]\n\n")
        (root,) = spans.finished("POST /v1/chat/completions")
        assert format(root.context.trace_id, "032x") == trace_id
        assert root.parent is not None and format(root.parent.span_id, "016x") == parent_id
        attributes = dict(root.attributes or {})
        assert attributes["tokenstream.front"] == "http" and attributes["tokenstream.caller_class"] == "batch"
        assert attributes["http.request.method"] == "POST" and attributes["gen_ai.usage.output_tokens"] == 3
        assert set(spans.children(root)) == {"queue", "prefill", "decode"}
        refused = httpx.post(base_url(srv) + "/v1/chat/completions", json={"messages": CHAT, "n": 3}, timeout=30,
                             headers={"x-request-id": "http-req-2"})
        assert refused.status_code == 400
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=5).read()
    finally:
        srv.close()
    counts = {(s.labels["front"], s.labels["grpc_code"], s.labels["finish_reason"]): s.value
              for family in text_string_to_metric_families(metrics.decode()) if family.name == "tokenstream_requests"
              for s in family.samples if s.name == "tokenstream_requests_total"}
    assert counts == {("http", "OK", "max_tokens"): 1.0, ("http", "INVALID_ARGUMENT", "none"): 1.0}
    lines = {r.fields["request_id"]: r.fields for r in caplog.records  # type: ignore[attr-defined]
             if getattr(r, "fields", {}).get("event") == "generate"}
    assert lines["http-req-1"]["front"] == "http" and lines["http-req-1"]["completion_tokens"] == 3
    assert lines["http-req-1"]["trace_id"] == trace_id
    assert lines["http-req-2"]["code"] == "INVALID_ARGUMENT"


def test_connections_send_each_frame_at_once(http_server: ServerThread) -> None:
    """The server's end of an accepted connection has TCP_NODELAY: without it, Nagle's algorithm held each SSE frame
    after the headers for the client's delayed ACK (40 ms more TTFT). The client's end is a plain socket, without
    it, so only the server can have set it on its own end."""
    with socket.create_connection(("127.0.0.1", http_server.running.http_port), timeout=60) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = http.client.HTTPResponse(sock)
        response.begin()  # answered: the server has accepted the connection, which stays open (keep-alive)
        assert response.status == 200 and json.loads(response.read())["data"][0]["id"] == model_name(http_server)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        assert accepted_nodelay(http_server, sock) == 1


def test_the_page_is_one_self_contained_file(http_server: ServerThread) -> None:
    response = httpx.get(base_url(http_server) + "/", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    # Nothing is fetched from elsewhere: no external script, style, font or image (machines may be offline).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html) and "@import" not in html
    csp = response.headers["content-security-policy"]
    for tag in ("script", "style"):
        (body,) = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    for control in ("prompt", "generate", "stop"):
        assert f'id="{control}"' in html
    assert 'for="prompt"' in html and 'aria-live="polite"' in html


async def _active_streams(server: ServerThread) -> int:
    return server.running.state.active_streams


def test_logprobs_bytes_offsets_and_no_end_of_sequence_entry(model_dir: Path) -> None:
    """Tokens that are part of a character carry their own bytes (they concatenate to the text's), completions'
    text_offset counts characters of the text, and the end-of-sequence token is no entry."""
    from service.engine.tokenizer import Tokenizer
    from service.engine.types import Chunk, Finish, TokenOut
    from service.http.requests import Parsed
    from service.http.responses import Responder
    from service.validation import GenerateParams

    tok = Tokenizer.from_dir(model_dir)
    text = "三国 𝄞⺀⺁ ok"  # 𝄞 and ⺀ are each split across two tokens in this vocabulary
    ids = tok.encode_full(text).ids
    eos = tok._tok.token_to_id("<|im_end|>")
    assert isinstance(eos, int), "the Qwen2 vocabulary has <|im_end|>"
    tokens = tuple(TokenOut(i, tok.decode([i]), -0.5) for i in [*ids, eos])
    assert any("\ufffd" in t.text for t in tokens), "the text should split a character across tokens"
    final = Chunk(text, tokens, Finish.EOS_TOKEN, 3, len(tokens))

    def logprobs(chat: bool) -> Any:
        responder = Responder(Parsed(chat, GenerateParams(logprobs=True)), "m", "r", eos_ids=(eos,),
                              token_bytes=tok.token_bytes)
        return responder.whole([final])["choices"][0]["logprobs"]

    entries = logprobs(chat=True)["content"]
    assert [e["bytes"] is None for e in entries] == [False] * len(ids)  # one entry a token, EOS none
    raw = [bytes(e["bytes"]) for e in entries]
    assert b"".join(raw) == text.encode()
    completion = logprobs(chat=False)
    assert len(completion["tokens"]) == len(ids)
    # A token starts after the whole characters of the bytes before it: one that continues a character, at it.
    starts = [len(b"".join(raw[:k]).decode("utf-8", "ignore")) for k in range(len(ids))]
    assert completion["text_offset"] == starts and starts[-1] < len(text)
