"""vLLM's gRPC contract (vllm.grpc.engine.VllmEngine) beside ours, through a client built from smg-grpc-proto's stubs:
the same tokens as tokenstream.v1 for one request, every unsupported field refused by name, the RPCs we do not
serve UNIMPLEMENTED, Abort, and GetLoads agreeing with the Model Server Protocol's gauges under a gated load."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families
from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as v

from service.config import Config
from tests.support.hooks import StepGate
from tests.support.rpc import violations
from tests.support.servers import ServerThread, base_config
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

PROMPT = "The river ran past the mill and"


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """Two slots and the metrics port, for conftest's gated server (decode steps only when a test permits them)."""
    return base_config(model_dir, max_slots=2, metrics_port=-1)


@pytest.fixture
def srv(gated_server: ServerThread) -> ServerThread:
    return gated_server


@pytest.fixture
def vllm(srv: ServerThread) -> Iterator[vllm_engine_pb2_grpc.VllmEngineStub]:
    with srv.channel() as ch:
        yield vllm_engine_pb2_grpc.VllmEngineStub(ch)


def greedy(max_tokens: int, **fields: Any) -> v.SamplingParams:
    return v.SamplingParams(temperature=0.0, max_tokens=max_tokens, min_tokens=max_tokens, **fields)


def test_reflection_lists_both_contracts(srv: ServerThread) -> None:
    with srv.channel() as ch:
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "vllm.grpc.engine.VllmEngine" in services and "tokenstream.v1.GenerationService" in services


def test_one_request_gives_the_same_tokens_on_both_contracts(srv: ServerThread, gate: StepGate,
                                                             vllm: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    gate.open()
    with srv.channel() as ch:
        ours = list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(
            prompt=PROMPT, stopping=pb.StoppingCriteria(max_new_tokens=12, min_new_tokens=12)), timeout=60))
    our_ids = [t.id for m in ours for t in m.tokens]
    assert len(our_ids) == 12

    streamed = list(vllm.Generate(v.GenerateRequest(request_id="same-1", text=PROMPT, stream=True,
                                                    sampling_params=greedy(12)), timeout=60))
    chunks = [m.chunk for m in streamed if m.WhichOneof("response") == "chunk"]
    assert [i for c in chunks for i in c.token_ids] == our_ids
    assert [c.completion_tokens for c in chunks] == sorted(c.completion_tokens for c in chunks)
    complete = streamed[-1].complete
    assert streamed[-1].WhichOneof("response") == "complete"
    assert (complete.finish_reason, complete.completion_tokens) == ("length", 12)
    assert complete.prompt_tokens == ours[-1].usage.prompt_tokens

    # Tokenized, as the router sends it, non-streaming: one GenerateComplete with every id.
    with srv.channel() as ch:
        ids = pb_grpc.GenerationServiceStub(ch).Tokenize(pb.TokenizeRequest(text=PROMPT), timeout=30).ids
    (only,) = list(vllm.Generate(v.GenerateRequest(
        request_id="same-2", tokenized=v.TokenizedInput(original_text=PROMPT, input_ids=ids),
        sampling_params=greedy(12, logprobs=2)), timeout=60))
    assert list(only.complete.output_ids) == our_ids
    assert list(only.complete.output_logprobs.token_ids) == our_ids
    assert [len(top.token_ids) for top in only.complete.output_logprobs.top_logprobs] == [2] * 12


def test_unsupported_fields_are_refused_by_name(vllm: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    req = v.GenerateRequest(text=PROMPT, data_parallel_rank=1, kv_transfer_params_json="{}",
                            sampling_params=v.SamplingParams(
        min_p=0.1, frequency_penalty=0.5, stop_token_ids=[7], ignore_eos=True, n=2, json_schema="{}",
        prompt_logprobs=1, logit_bias={5: 1.0}, logprobs=-1))
    with pytest.raises(grpc.RpcError) as err:
        list(vllm.Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(violations(err.value)) == {
        "sampling_params.min_p", "sampling_params.frequency_penalty", "sampling_params.stop_token_ids",
        "sampling_params.ignore_eos", "sampling_params.n", "sampling_params.json_schema",
        "sampling_params.prompt_logprobs", "sampling_params.logit_bias", "sampling_params.logprobs",
        "data_parallel_rank", "kv_transfer_params_json"}
    # The shared validation's findings, spelled as this contract spells its fields.
    with pytest.raises(grpc.RpcError) as err:
        list(vllm.Generate(v.GenerateRequest(text=PROMPT, sampling_params=v.SamplingParams(
            top_p=2.0, max_tokens=100_000)), timeout=30))
    assert set(violations(err.value)) == {"sampling_params.top_p", "sampling_params.max_tokens"}
    with pytest.raises(grpc.RpcError) as err:
        list(vllm.Generate(v.GenerateRequest(tokenized=v.TokenizedInput(input_ids=[10**9])), timeout=30))
    assert set(violations(err.value)) == {"tokenized.input_ids"}


def test_rpcs_not_served_answer_unimplemented(vllm: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        vllm.Embed(v.EmbedRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "Embed" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        list(vllm.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_management_rpcs_describe_the_engine(srv: ServerThread, vllm: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    assert vllm.HealthCheck(v.HealthCheckRequest(), timeout=10).healthy is True
    info = vllm.GetModelInfo(v.GetModelInfoRequest(), timeout=10)
    assert (info.served_model_name, info.max_context_length, info.vocab_size) == (
        srv.engine.info.name, srv.engine.info.max_context, srv.engine.info.vocab_size)
    server = vllm.GetServerInfo(v.GetServerInfoRequest(), timeout=10)
    assert (server.max_num_seqs, server.block_size, server.is_paused) == (2, 32, False)


def gauges(srv: ServerThread) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("vllm:") and s.name != "vllm:cache_config_info"}


def test_abort_ends_a_stream_and_get_loads_matches_the_gauges(srv: ServerThread, gate: StepGate,
                                                              vllm: vllm_engine_pb2_grpc.VllmEngineStub) -> None:
    def stream(rid: str) -> list[v.GenerateResponse]:
        return list(vllm.Generate(v.GenerateRequest(request_id=rid, text=PROMPT, stream=True,
                                                    sampling_params=greedy(20)), timeout=60))

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(stream, f"load-{i}") for i in range(2)]
        assert srv.engine.wait_until(lambda s: s.active == 2 and s.prefilling == 0, 60)
        third = pool.submit(stream, "load-2")
        assert srv.engine.wait_until(lambda s: s.waiting == 1, 60)
        (load,) = vllm.GetLoads(v.GetLoadsRequest(), timeout=10).loads
        g = gauges(srv)
        assert (load.num_running_reqs, load.num_waiting_reqs) == (2, 1)
        assert (load.num_running_reqs, load.num_waiting_reqs, load.token_usage) == (
            g["vllm:num_requests_running"], g["vllm:num_requests_waiting"], g["vllm:kv_cache_usage_perc"])
        assert load.max_running_requests == 2

        vllm.Abort(v.AbortRequest(request_ids=["load-0", "not-here"]), timeout=10)
        aborted = first[0].result(60)
        assert aborted[-1].complete.finish_reason == "abort"
        assert aborted[-1].complete.completion_tokens == 1  # its prefill token: the gate permitted no step
        gate.open()
        assert first[1].result(60)[-1].complete.finish_reason == "length"
        assert third.result(60)[-1].complete.finish_reason == "length"
