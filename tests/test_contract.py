"""The stream contract as properties, checked with hypothesis against the real server and Paddle engine."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reference import NumpyLlama
from tests.support.hooks import StepGate
from tests.support.servers import ServerThread, base_config, started
from tests.test_server import bad_fields
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

CHINESE = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种"
    "面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本"
    "去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比"
    "或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
    "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做"
    "必战先回则任取据处理府研质"
)
EMOJI = "😀🐍🦀🎉🚀👍🏽🇨🇳❤️‍🔥"
ENGLISH = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "def", "return", "class", "import", "\n"]


@st.composite
def prompts(draw: st.DrawFn) -> str:
    pieces = draw(st.lists(st.one_of(
        st.text(alphabet=CHINESE, min_size=1, max_size=6),
        st.sampled_from(ENGLISH),
        st.text(alphabet=EMOJI, min_size=1, max_size=3),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=4),
    ), min_size=1, max_size=6))
    text = " ".join(pieces).strip()
    return text or "hello"


def sampled(prompt: str, seed: int, n: int = 24, temperature: float = 1.5, **stopping: object) -> pb.GenerateRequest:
    # A hot temperature on random weights picks byte-piece tokens often: split characters every few tokens.
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(temperature=temperature, seed=seed),
                              stopping=pb.StoppingCriteria(max_new_tokens=n, **stopping))  # type: ignore[arg-type]


def ids_of(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [t.id for m in msgs for t in m.tokens]


@pytest.fixture(scope="module")
def tok(loaded_model):
    return loaded_model.tokenizer


@given(prompt=prompts(), seed=st.integers(0, 2**63 - 1))
@PROPERTY
def test_deltas_concatenate_to_the_decode_byte_for_byte(stub, tok, prompt: str, seed: int) -> None:
    msgs = list(stub.Generate(sampled(prompt, seed), timeout=60))
    full = tok.decode(ids_of(msgs))
    assert "".join(m.text for m in msgs).encode() == full.encode()
    for i, m in enumerate(msgs):
        if "\ufffd" in m.text:  # only where the full decode itself has one
            assert "\ufffd" in full
        assert m.text or i == len(msgs) - 1, "no empty delta except the final message"
        if m.text:
            assert m.tokens, "every delta says which tokens it covers"
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert final.usage.completion_tokens == len(ids_of(msgs)) == 24
    assert final.usage.prompt_tokens == len(tok.encode(prompt))
    assert final.seed == seed
    assert final.timings.time_to_first_token_ms > 0 and final.timings.total_ms >= final.timings.decode_ms


@given(prompt=prompts(), seed=st.integers(0, 2**32), start=st.integers(0, 40), length=st.integers(1, 6),
       include=st.booleans())
@PROPERTY
def test_stop_sequences_match_across_tokens_and_never_leak(stub, tok, prompt, seed, start, length, include) -> None:
    reference = list(stub.Generate(sampled(prompt, seed, n=48, temperature=0.8), timeout=60))
    full = "".join(m.text for m in reference)
    if len(full) < 2:
        return
    start = start % (len(full) - 1)
    stop = full[start : start + length]
    if not stop.strip("\ufffd"):
        return
    first = full.find(stop)
    msgs = list(stub.Generate(sampled(prompt, seed, n=48, temperature=0.8, stop_sequences=[stop, "\x00never"],
                                      include_stop_sequence=include), timeout=60))
    text = "".join(m.text for m in msgs)
    final = msgs[-1]
    assert final.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert final.stop_sequence == stop
    assert text == full[: first + (len(stop) if include else 0)]
    # Released as soon as known: what is held back after each message could still start a stop sequence.
    released, ids = "", []
    for m in msgs[:-1]:
        released += m.text
        ids += [t.id for t in m.tokens]
        held = tok.decode(ids)[len(released):]
        assert held == "" or held.endswith("\ufffd") or any(s.startswith(held) for s in (stop, "\x00never")), held
    # Usage counts the tokens up to the one that completed the stop, and those match the seeded reference.
    assert ids_of(msgs) == ids_of(reference)[: final.usage.completion_tokens]


@given(seed=st.integers(0, 2**63 - 1), prompt=prompts(), others=st.integers(1, 5))
@PROPERTY
def test_seeded_sampling_reproduces_whatever_shares_the_batch(server, stub, seed, prompt, others) -> None:
    req = pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(temperature=0.9, top_k=40, top_p=0.95,
                                                                       seed=seed),
                             stopping=pb.StoppingCriteria(max_new_tokens=16))
    alone = ids_of(list(stub.Generate(req, timeout=60)))
    noise = [stub.Generate(sampled(f"noise {i} 噪声", seed + i + 1, n=30), timeout=60) for i in range(others)]
    batched = ids_of(list(stub.Generate(req, timeout=60)))
    for call in noise:
        list(call)
    assert batched == alone


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


@pytest.fixture(scope="module")
def eos_server(model_dir: Path, loaded_model, tmp_path_factory) -> Iterator[tuple[ServerThread, int, int]]:
    """The test model with an early greedy token declared EOS, and no chat template."""
    prompt = "The capital of France is"
    ref = NumpyLlama(model_dir).greedy(loaded_model.tokenizer.encode(prompt), 12)
    at = next(i for i in range(1, len(ref)) if ref[i] not in ref[:i])  # the first new token after the first
    variant = _variant(model_dir, tmp_path_factory.mktemp("eos") / "model", {"eos_token_id": [ref[at]]},
                       {"eos_token": "x"})
    srv = started(base_config(variant))
    yield srv, ref[at], at
    srv.close()


@given(min_new=st.integers(0, 12))
@PROPERTY
def test_min_new_tokens_suppresses_eos(eos_server, min_new: int) -> None:
    srv, eos, at = eos_server
    with srv.channel() as ch:
        req = pb.GenerateRequest(prompt="The capital of France is",
                                 stopping=pb.StoppingCriteria(max_new_tokens=24, min_new_tokens=min_new))
        msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(req, timeout=60))
    ids = ids_of(msgs)
    assert eos not in ids[:min_new]
    if min_new <= at:
        assert msgs[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN and len(ids) == at + 1 and ids[-1] == eos
    else:
        assert len(ids) >= min_new
    assert msgs[-1].usage.completion_tokens == len(ids)
    # The EOS token is reported among the tokens but never decoded into text.
    assert "".join(m.text for m in msgs) == srv.engine.tokenizer.decode(
        [i for i in ids if i != eos])


def test_chat_without_template_is_invalid_argument(eos_server) -> None:
    srv = eos_server[0]
    with srv.channel() as ch, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.GenerationServiceStub(ch).Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages" in bad_fields(err.value) and "chat template" in err.value.details()


def _hf_repetition_penalty(logits: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor, written out."""
    out = logits.copy()
    s = np.unique(seen)
    out[s] = np.where(out[s] < 0, out[s] * penalty, out[s] / penalty)
    return out


@given(penalty=st.sampled_from([1.3, 2.0, 0.8]))
@PROPERTY
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
    assert all(not m.prompt_token_ids for m in msgs[1:])
    ref = NumpyLlama(model_dir)
    ids = list(prompt_ids)
    for token in [t for m in msgs for t in m.tokens]:
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
    assert info.has_chat_template and info.max_top_n == 10 and info.max_batch_size == 8


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
