"""The stream contract as properties, checked with hypothesis against the real server and Paddle engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reference import NumpyLlama
from tests.support.hooks import StepGate
from tests.support.properties import (
    NEAR_MISS_ONLY,
    STOP_ACROSS_TOKENS,
    STOPS_COMPETE,
    UTF8_SPLIT,
    Reach,
    deltas_concatenate,
    prompts,
    sampled,
    seeds_reproduce_in_a_shared_step,
    stops_match_as_the_oracle_says,
)
from tests.support.rpc import bad_fields, ids_of
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

# The @given tests take their settings from the hypothesis profile (tests/conftest.py): 25 fixed examples in
# `make test`, many random ones in `make test-deep`.



@pytest.fixture(scope="module")
def demo() -> Iterator[ServerThread]:
    """The demo model (trained here, a 4,096-token byte-level vocabulary): its Chinese splits characters across
    tokens in most streams, where the random test model's Qwen2 vocabulary almost never does."""
    srv = started(base_config("demo"))
    yield srv
    srv.close()


@pytest.mark.reaches(UTF8_SPLIT)
@given(prompt=prompts(), seed=st.integers(0, 2**63 - 1))
def test_deltas_concatenate_to_the_decode_byte_for_byte(demo: ServerThread, reach: Reach, prompt: str,
                                                         seed: int) -> None:
    with demo.channel() as ch:
        deltas_concatenate(pb_grpc.GenerationServiceStub(ch), demo.engine.tokenizer, prompt, seed, reach)


@pytest.mark.reaches(STOP_ACROSS_TOKENS, STOPS_COMPETE, NEAR_MISS_ONLY)
@given(prompt=prompts(), seed=st.integers(0, 2**32), include=st.booleans(), data=st.data())
def test_stop_sequences_match_as_the_oracle_says_and_never_leak(stub, reach: Reach, prompt: str, seed: int,
                                                                 include: bool, data: st.DataObject) -> None:
    stops_match_as_the_oracle_says(stub, prompt, seed, include, data, reach)


@given(seed=st.integers(0, 2**63 - 1), prompt=prompts(), others=st.integers(1, 5))
def test_seeded_sampling_reproduces_whatever_shares_the_batch(gated_server, gate, gated_stub, seed, prompt,
                                                              others) -> None:
    seeds_reproduce_in_a_shared_step(gated_server, gate, gated_stub, seed, prompt, others)


def _variant(src: Path, dst: Path, config: dict | None = None, tokenizer_config: dict | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "tokenizer.json"):
        (dst / name).symlink_to(src / name)
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    if config is not None:
        (dst / "generation_config.json").write_text(json.dumps(config))
    if tokenizer_config is not None:
        (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return dst


EOS_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class EosModel:
    server: ServerThread
    greedy: list[int]  # the reference's greedy tokens for EOS_PROMPT
    at: int  # greedy[at] is declared EOS

    @property
    def eos(self) -> int:
        return self.greedy[self.at]

    def generate(self, min_new: int) -> list[pb.GenerateResponse]:
        with self.server.channel() as ch:
            req = pb.GenerateRequest(prompt=EOS_PROMPT,
                                     stopping=pb.StoppingCriteria(max_new_tokens=24, min_new_tokens=min_new))
            return list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=60))


@pytest.fixture(scope="module")
def eos_model(model_dir: Path, loaded_model, tmp_path_factory) -> Iterator[EosModel]:
    """The test model with an early greedy token declared EOS, and no chat template."""
    ref = NumpyLlama(model_dir).greedy(loaded_model.tokenizer.encode(EOS_PROMPT), 12)
    at = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])  # the first new token after the first
    variant = _variant(model_dir, tmp_path_factory.mktemp("eos") / "model", {"eos_token_id": [ref[at]]},
                       {"eos_token": "x"})
    srv = started(base_config(variant))
    yield EosModel(srv, ref, at)
    srv.close()


def _eos_never_decoded(model: EosModel, msgs: list[pb.GenerateResponse]) -> None:
    ids = ids_of(msgs)
    assert msgs[-1].usage.completion_tokens == len(ids)
    # The EOS token is reported among the tokens but never decoded into text.
    assert "".join(m.text for m in msgs) == model.server.engine.tokenizer.decode([i for i in ids if i != model.eos])


@given(data=st.data())
def test_eos_within_min_new_tokens_is_never_sampled(eos_model: EosModel, data: st.DataObject) -> None:
    """min_new_tokens past the greedy EOS: EOS is banned there, so the stream goes on past it."""
    model = eos_model
    min_new = data.draw(st.integers(model.at + 1, 12), label="min_new_tokens")
    msgs = model.generate(min_new)
    ids = ids_of(msgs)
    assert ids[: model.at] == model.greedy[: model.at]
    assert model.eos not in ids[:min_new] and len(ids) >= min_new
    # Afterwards it may end with EOS or run to max_new_tokens; either way the reason says which.
    ended = pb.FINISH_REASON_EOS_TOKEN if ids[-1] == model.eos else pb.FINISH_REASON_MAX_TOKENS
    assert msgs[-1].finish_reason == ended
    assert model.eos not in ids[:-1] and (ended == pb.FINISH_REASON_EOS_TOKEN or len(ids) == 24)
    _eos_never_decoded(model, msgs)


@given(data=st.data())
def test_eos_after_min_new_tokens_ends_the_stream(eos_model: EosModel, data: st.DataObject) -> None:
    model = eos_model
    min_new = data.draw(st.integers(0, model.at), label="min_new_tokens")
    msgs = model.generate(min_new)
    assert msgs[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN
    assert ids_of(msgs) == model.greedy[: model.at + 1]
    _eos_never_decoded(model, msgs)


def test_chat_without_template_is_invalid_argument(eos_model: EosModel) -> None:
    srv = eos_model.server
    with srv.channel() as ch, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(err.value) == ["messages"] and "chat template" in err.value.details()


def _hf_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor, written out."""
    out = logits.copy()
    s = np.unique(seen)
    out[s] = np.where(out[s] < 0, out[s] * penalty, out[s] / penalty)
    return out


@given(penalty=st.sampled_from([1.3, 2.0, 0.8]))
def test_repetition_penalty_matches_the_common_implementation(stub, tok, model_dir, penalty: float) -> None:
    prompt = "la la la la"
    prompt_ids = tok.encode(prompt)
    ref = NumpyLlama(model_dir)
    ids: list[int] = []
    for _ in range(8):
        z = _hf_repetition_penalty(ref.logits(prompt_ids + ids), prompt_ids + ids, penalty)
        top2 = np.partition(z, -2)[-2:]
        if top2[1] - top2[0] < 1e-4:
            break
        ids.append(int(np.argmax(z)))
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(repetition_penalty=penalty),
                             stopping=pb.StoppingCriteria(max_new_tokens=8))
    got = ids_of(list(stub.Generate(req, timeout=60)))
    assert len(ids) >= 4 and got[: len(ids)] == ids


def test_logprobs_and_top_n_match_the_reference(stub, tok, model_dir) -> None:
    prompt = "The capital of France is"
    prompt_ids = tok.encode(prompt)
    req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=4),
                             response=pb.ResponseOptions(logprobs=True, top_n=5, echo_prompt_tokens=True))
    msgs = list(stub.Generate(req, timeout=60))
    assert list(msgs[0].prompt_token_ids) == prompt_ids
    assert [list(m.prompt_token_ids) for m in msgs[1:]] == [[]] * (len(msgs) - 1)
    ref = NumpyLlama(model_dir)
    ids = list(prompt_ids)
    tokens = [t for m in msgs for t in m.tokens]
    assert len(tokens) == 4
    for token in tokens:
        z = ref.logits(ids)
        lp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        assert token.HasField("logprob") and abs(token.logprob - lp[token.id]) < 1e-3
        assert len(token.top_tokens) == 5
        assert token.top_tokens[0].id == token.id  # greedy picks the most likely
        assert [t.logprob for t in token.top_tokens] == sorted((t.logprob for t in token.top_tokens), reverse=True)
        assert {t.id for t in token.top_tokens} == set(np.argsort(-lp)[:5].tolist())
        ids.append(token.id)


def test_time_limit_from_the_grpc_deadline_is_graceful(model_dir) -> None:
    """The stream cannot finish before the deadline (its engine gets two decode steps, then none), so it must be
    the server that ends it, early enough (the margin) for the final message to reach the caller in time."""
    gate = StepGate(gated=True)
    srv = started(base_config(model_dir, deadline_margin_ms=300), hooks=gate)
    try:
        with srv.channel() as ch:
            req = pb.GenerateRequest(prompt="long", stopping=pb.StoppingCriteria(max_new_tokens=400))
            gate.permit(2)
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=1.5))
    finally:
        srv.close()
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_TIME_LIMIT
    assert final.usage.completion_tokens == len(ids_of(msgs)) == 3
    assert final.timings.total_ms < 1500


CONTRACT_ERRORS = [
    (pb.GenerateRequest(prompt="x", messages=[pb.ChatMessage(role="user", content="y")]), "messages"),
    (pb.GenerateRequest(prompt="x", response=pb.ResponseOptions(top_n=11)), "response.top_n"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["a"] * 9)),
     "stopping.stop_sequences"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["ok", ""])),
     "stopping.stop_sequences[1]"),
    (pb.GenerateRequest(prompt="x", stopping=pb.StoppingCriteria(stop_sequences=["z" * 257])),
     "stopping.stop_sequences[0]"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="", content="y")]), "messages[0].role"),
]


@pytest.mark.parametrize(("request_", "field"), CONTRACT_ERRORS, ids=[f for _, f in CONTRACT_ERRORS])
def test_invalid_combinations_name_the_field(stub, request_, field) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(request_, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_fields(err.value)


def test_chat_messages_render_with_the_template(stub, tok) -> None:
    messages = [pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="你好")]
    msgs = list(stub.Generate(pb.GenerateRequest(messages=messages, stopping=pb.StoppingCriteria(max_new_tokens=3)),
                              timeout=30))
    rendered = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert msgs[-1].usage.prompt_tokens == len(tok.encode(rendered))


def test_tokenize_returns_ids_strings_offsets_and_truncates(stub, tok) -> None:
    text = "龘a你好🐍 b"
    resp = stub.Tokenize(pb.TokenizeRequest(text=text, return_tokens=True, return_offsets=True), timeout=10)
    assert list(resp.ids) == tok.encode(text) and resp.token_count == len(resp.ids)
    assert len(resp.tokens) == len(resp.offsets) == len(resp.ids)
    covered = "".join(text[o.start : o.end] for i, o in enumerate(resp.offsets)
                      if i == 0 or (o.start, o.end) != (resp.offsets[i - 1].start, resp.offsets[i - 1].end))
    assert covered == text
    short = stub.Tokenize(pb.TokenizeRequest(text=text, truncate_to=2), timeout=10)
    assert list(short.ids) == list(resp.ids)[-2:] and short.token_count == 2
    with pytest.raises(grpc.RpcError) as err:
        stub.Tokenize(pb.TokenizeRequest(text=""), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_fields(err.value) == ["text"]


def test_model_info_describes_the_model_and_limits(stub, loaded_model) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.architecture == "LlamaForCausalLM"
    assert info.model_name == loaded_model.name
    assert info.vocab_size == 151936
    assert info.max_context_length == 512
    assert list(info.eos_token_ids) == [151643, 151645]
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert (info.has_chat_template, info.max_top_n, info.max_batch_size) == (True, 10, 8)


# -- sampling parameters really act (a server that ignored them would fail these) ----------------------------


def test_top_k_one_and_a_tiny_top_p_equal_greedy(stub) -> None:
    prompt = "Once upon a time"
    greedy = ids_of(list(stub.Generate(pb.GenerateRequest(
        prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=16)), timeout=60)))
    for seed in (1, 2, 3):
        for sampling in (pb.SamplingParams(temperature=1.5, top_k=1, seed=seed),
                         pb.SamplingParams(temperature=1.5, top_p=1e-6, seed=seed)):
            got = ids_of(list(stub.Generate(pb.GenerateRequest(
                prompt=prompt, sampling=sampling, stopping=pb.StoppingCriteria(max_new_tokens=16)), timeout=60)))
            assert got == greedy, sampling
    # ... while plain sampling at that temperature does not follow the greedy path.
    hot = ids_of(list(stub.Generate(sampled(prompt, seed=1, n=16), timeout=60)))
    assert hot != greedy


def test_temperature_shapes_the_distribution(stub, tok, model_dir) -> None:
    """First tokens of 800 seeded requests, among the 20 likeliest, follow softmax(z / T) for the T asked for and
    not for another T (a chi-square goodness-of-fit test; the seeds are fixed, so the outcome is too)."""
    from scipy.stats import chisquare

    prompt = "The weather today"
    z = NumpyLlama(model_dir).logits(tok.encode(prompt)).astype(np.float64)
    top = np.argsort(-z)[:20]

    def expected(temperature: float) -> np.ndarray:
        p = np.exp((z[top] - z[top].max()) / temperature)
        return p / p.sum()

    n, temperature = 800, 0.3
    counts = dict.fromkeys(top.tolist(), 0)
    for seed in range(n):
        sampling = pb.SamplingParams(temperature=temperature, top_k=20, seed=seed)
        req = pb.GenerateRequest(prompt=prompt, sampling=sampling, stopping=pb.StoppingCriteria(max_new_tokens=1))
        first = ids_of(list(stub.Generate(req, timeout=30)))[0]
        counts[first] += 1  # a KeyError here would mean top_k was ignored
    observed = np.array([counts[t] for t in top.tolist()], dtype=np.float64)
    keep = expected(temperature) * n >= 5  # chi-square needs enough expected counts per bin: pool the rest

    def pooled(x: np.ndarray) -> np.ndarray:
        return np.append(x[keep], x[~keep].sum()) if not keep.all() else x

    obs = pooled(observed)
    assert chisquare(obs, pooled(expected(temperature) * n)).pvalue > 1e-3
    for wrong in (0.15, 0.6):
        assert chisquare(obs, pooled(expected(wrong) * n)).pvalue < 1e-6, wrong
