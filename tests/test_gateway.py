"""The inference gateway's Model Server Protocol (#gateway): what each gauge says, at each moment of a scripted load.

Tested by meaning, not by name: the step gate decides when the engine decodes, so a test knows how many requests
wait, how many hold a slot and how many positions each has in the cache, and checks that the gauges the endpoint
picker reads say exactly that, on the metrics port and at GET /metrics on the HTTP port alike. No wall-clock
times, no sleeps: every wait is on the engine's own state (Engine.wait_until).
"""

from __future__ import annotations

import math
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Config
from service.engine.api import KV_BLOCK
from service.engine.attention import KEY_BLOCK
from tests.support.hooks import StepGate
from tests.support.http_front import RawCall
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

SLOTS = 2
CONTEXT = 512  # base_config's max_context
PICKER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc")


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """Two slots and both ports on, for conftest's gated server (decode steps only when a test permits them)."""
    return base_config(model_dir, max_slots=SLOTS, max_context=CONTEXT, metrics_port=-1, http_port=-1)


@pytest.fixture
def gw(gated_server: ServerThread) -> ServerThread:
    return gated_server


def scrape(url: str) -> dict[str, Any]:
    """The Model Server Protocol's samples as the picker reads them: each gauge's value, and the cache info's
    labels."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: dict[str, Any] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in PICKER_GAUGES:
                out[sample.name] = sample.value
            elif sample.name == "vllm:cache_config_info":
                out["block_size"] = int(sample.labels["block_size"])
                out["num_gpu_blocks"] = int(sample.labels["num_gpu_blocks"])
                out["info_value"] = sample.value
    return out


def both_fronts(gw: ServerThread) -> dict[str, Any]:
    """One scrape from each port; the engine stands still (gate closed), so the two must agree exactly."""
    on_metrics_port = scrape(f"http://127.0.0.1:{gw.running.metrics_port}/metrics")
    on_http_port = scrape(f"http://127.0.0.1:{gw.running.http_port}/metrics")
    assert on_metrics_port == on_http_port
    return on_http_port


def blocks(positions: int) -> int:
    return math.ceil(positions / KV_BLOCK)


def prompt_of(gw: ServerThread, tokens: int) -> str:
    """A prompt of exactly `tokens` tokens (so that decoding crosses a block boundary at a known step)."""
    words: list[str] = []
    while len(gw.engine.tokenizer.encode(" ".join(words))) < tokens:
        words.append("north")
    text = " ".join(words)
    assert len(gw.engine.tokenizer.encode(text)) == tokens
    return text


def test_the_attention_block_is_the_cache_block_the_gauges_count() -> None:
    assert KV_BLOCK == KEY_BLOCK


def test_each_gauge_says_what_the_protocol_means_under_a_scripted_load(gw: ServerThread, gate: StepGate) -> None:
    """Slots full with a queue of known length, then one stream ending and the queued one taking its slot, then
    all done: at each moment the queue, the running requests and the KV-cache fraction (blocks in use over the
    blocks of every slot at the full context) are exactly what the engine holds. Load comes through both fronts."""
    total_blocks = SLOTS * blocks(CONTEXT)
    prompt_tokens = KV_BLOCK - 1  # 31 positions: one block after prefill, two after the second decode step
    prompt = prompt_of(gw, prompt_tokens)
    moments: list[tuple[str, dict[str, Any]]] = []

    idle = both_fronts(gw)
    moments.append(("idle", idle))
    assert idle == {"vllm:num_requests_waiting": 0, "vllm:num_requests_running": 0, "vllm:kv_cache_usage_perc": 0,
                    "block_size": KV_BLOCK, "num_gpu_blocks": total_blocks, "info_value": 1}

    def grpc_stream(max_new: int) -> list[pb.GenerateResponse]:
        with gw.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            return list(stub.Generate(pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(
                max_new_tokens=max_new, min_new_tokens=max_new)), timeout=120))

    def http_stream(max_new: int) -> list[Any]:
        call = RawCall(gw.running.http_port, "/v1/completions", {
            "model": gw.engine.info.name, "prompt": prompt, "max_tokens": max_new, "min_tokens": max_new,
            "stream": True, "stream_options": {"include_usage": True}})
        try:
            assert call.response.status == 200
            return list(call.payloads())
        finally:
            call.close()

    with ThreadPoolExecutor(3) as pool:
        # A (gRPC, 3 tokens) and B (HTTP, 6 tokens) take both slots and are prefilled with the gate closed.
        a: Future[Any] = pool.submit(grpc_stream, 3)
        b: Future[Any] = pool.submit(http_stream, 6)
        assert gw.engine.wait_until(lambda s: s.active == 2 and s.prefilling == 0, 60)
        c: Future[Any] = pool.submit(grpc_stream, 2)  # C (gRPC, 2 tokens) finds no slot: it waits
        assert gw.engine.wait_until(lambda s: s.waiting == 1, 60)
        full = both_fronts(gw)
        moments.append(("slots full, one queued", full))
        assert full["vllm:num_requests_waiting"] == 1
        assert full["vllm:num_requests_running"] == 2
        assert full["vllm:kv_cache_usage_perc"] == 2 * blocks(prompt_tokens) / total_blocks  # 31 positions each

        # Two decode steps: A has its 3 tokens and ends; its slot goes to C, which is prefilled; B holds 33
        # positions (the prompt and two written tokens), a second block.
        steps = gw.engine.stats().steps
        gate.permit(2)
        assert gw.engine.wait_until(lambda s: s.steps == steps + 2 and s.active == 2 and s.waiting == 0
                                    and s.prefilling == 0, 60)
        a_out = a.result(60)
        handed_over = both_fronts(gw)
        moments.append(("A ended, C took its slot", handed_over))
        assert handed_over["vllm:num_requests_waiting"] == 0
        assert handed_over["vllm:num_requests_running"] == 2
        assert handed_over["vllm:kv_cache_usage_perc"] == (blocks(prompt_tokens + 2) + blocks(prompt_tokens)) \
            / total_blocks

        # One more step: C (2 tokens) ends; B goes on alone with 34 positions.
        gate.permit(1)
        assert gw.engine.wait_until(lambda s: s.steps == steps + 3 and s.active == 1 and s.prefilling == 0, 60)
        c_out = c.result(60)
        alone = both_fronts(gw)
        moments.append(("C ended, B alone", alone))
        assert alone["vllm:num_requests_waiting"] == 0
        assert alone["vllm:num_requests_running"] == 1
        assert alone["vllm:kv_cache_usage_perc"] == blocks(prompt_tokens + 3) / total_blocks

        gate.open()
        b_out = b.result(60)
        assert gw.engine.wait_until(lambda s: s.active + s.prefilling + s.waiting == 0, 60)
    done = both_fronts(gw)
    moments.append(("all ended", done))
    assert done == idle

    # The streams were what the script says: A 3 tokens, C 2, B 6, each on a prompt of 31 tokens.
    assert a_out[-1].usage.completion_tokens == 3 and a_out[-1].usage.prompt_tokens == prompt_tokens
    assert c_out[-1].usage.completion_tokens == 2 and c_out[-1].usage.prompt_tokens == prompt_tokens
    usage = [p["usage"] for p in b_out if isinstance(p, dict) and p.get("usage")][-1]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] == prompt_tokens
    for name, sample in moments:
        print(f"{name:26} {sample}")


def test_metrics_on_the_http_port_need_no_token_and_speak_openmetrics_when_asked(model_dir: Path) -> None:
    """The picker scrapes without credentials, as on the metrics port; an OpenMetrics Accept gets OpenMetrics."""
    srv = started(base_config(model_dir, http_port=-1, auth_tokens="secret-token"))
    try:
        url = f"http://127.0.0.1:{srv.running.http_port}/metrics"
        plain = urllib.request.urlopen(url, timeout=10)
        assert plain.headers["content-type"].startswith("text/plain")
        assert b"vllm:num_requests_running 0.0" in plain.read()
        om = urllib.request.urlopen(urllib.request.Request(
            url, headers={"accept": "application/openmetrics-text; version=1.0.0"}), timeout=10)
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.read().rstrip().endswith(b"# EOF")
    finally:
        srv.close()
