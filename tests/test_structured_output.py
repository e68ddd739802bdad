"""Structured output on both fronts: every finished constrained output parses and validates, or matches.

The suite model has random weights, so its outputs are arbitrary within the constraint: a good test that the masks,
not the model, keep the output valid. The corpus's schemas are bounded (string lengths, array sizes,
additionalProperties false) so that a random walk ends within the token budget; the finish reason says it did.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import numpy as np
import openai
import pytest

from service.engine.constraints import ConstraintError, MaskBatch, compile_constraint, ll_tokenizer
from service.engine.tokenizer import Tokenizer
from tests.support.http_front import base_url
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

SEEDS = (1, 2, 3)
BUDGET = 400  # tokens: far more than any bounded corpus output needs on this vocabulary

S = {"type": "string", "maxLength": 8}


def obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


CORPUS: list[dict[str, Any]] = [
    obj({"name": S}),
    obj({"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 150}}),
    obj({"ok": {"type": "boolean"}}),
    obj({"x": {"type": "number", "minimum": -1, "maximum": 1}}),
    obj({"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"status": {"const": "done"}, "code": {"type": "integer", "minimum": 100, "maximum": 599}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 4}}),
    obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 999}, "name": S})}),
    obj({"a": obj({"b": obj({"c": {"type": "boolean"}})})}),
    obj({"name": S, "nick": S, "age": {"type": "integer", "minimum": 0, "maximum": 9}}, required=["name"]),
    obj({"opt": S}, required=[]),
    obj({"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}}),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"}}),
    obj({"email": {"type": "string", "pattern": "^[a-z]{1,6}@[a-z]{1,6}\\.com$"}}),
    obj({"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "boolean"}]}}),
    obj({"v": {"type": ["integer", "null"], "minimum": 0, "maximum": 99}}),
    obj({"items": {"type": "array", "maxItems": 2, "items": obj({"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                                                     "maximum": 5}})}}),
    obj({"point": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                    {"type": "integer", "minimum": 0, "maximum": 9}],
                   "items": False, "minItems": 2}}),
    {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 5},
    {"enum": ["yes", "no", "maybe"]},
    obj({"level": {"type": "string", "enum": ["low", "mid", "high"]}, "note": {"type": "string", "minLength": 1,
                                                                                "maxLength": 5}}),
]

HOSTILE: list[tuple[str, Any]] = [
    ("json_schema", json.dumps(obj({"a": {"$ref": "#"}}, required=["a"]))),  # infinitely deep, required
    ("json_schema", json.dumps({"type": "object", "properties": {"a": {}}, "allOf": [{"type": "string"}]})),
    ("json_schema", json.dumps({"enum": [f"value-{i}" for i in range(3000)]})),  # a huge enum: bounded text
    ("regex", "(a*)*b" * 40),  # catastrophic for a backtracking engine; llguidance's is automata
    ("regex", "(x+x+)+y"),
    ("regex", "[a-z]{1000}{1000}"),
]


def _nest(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = obj({"a": schema})
    return schema


@pytest.fixture(scope="module")
def srv(model_dir: Path) -> Iterator[ServerThread]:
    """Both fronts over one engine."""
    server = started(base_config(model_dir, http_port=-1, metrics_port=-1))
    try:
        yield server
    finally:
        server.close()



def _request(constraint: pb.OutputConstraint, seed: int, prompt: str = "Answer in JSON:",
             max_new: int = BUDGET) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, constraint=constraint,
                              sampling=pb.SamplingParams(temperature=1.0, seed=seed),
                              stopping=pb.StoppingCriteria(max_new_tokens=max_new))


def _generate(srv: ServerThread, reqs: list[pb.GenerateRequest]) -> list[list[pb.GenerateResponse]]:
    """All at once, so the constrained rows share decode steps."""
    with srv.channel() as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(lambda r: list(stub.Generate(r, timeout=300)), reqs))


def _text(msgs: list[pb.GenerateResponse]) -> str:
    return "".join(m.text for m in msgs)


# -- the corpus, on the gRPC front -----------------------------------------------------------------------------


def test_the_corpus_has_at_least_twenty_schemas_and_each_is_valid() -> None:
    assert len(CORPUS) >= 20
    for schema in CORPUS:
        jsonschema.Draft202012Validator.check_schema(schema)


def test_every_constrained_output_of_the_corpus_parses_and_validates(srv: ServerThread) -> None:
    reqs = [_request(pb.OutputConstraint(json_schema=json.dumps(s)), seed) for s in CORPUS for seed in SEEDS]
    for (schema, seed), msgs in zip([(s, seed) for s in CORPUS for seed in SEEDS], _generate(srv, reqs),
                                    strict=True):
        text = _text(msgs)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN, (schema, seed, text)
        jsonschema.validate(json.loads(text), schema)


def test_constrained_and_unconstrained_rows_share_a_batch_and_the_unconstrained_are_untouched(
    srv: ServerThread,
) -> None:
    plain = pb.GenerateRequest(prompt="Tell me a story", stopping=pb.StoppingCriteria(max_new_tokens=24))
    solo = _generate(srv, [plain])[0]
    mixed = _generate(srv, [plain, _request(pb.OutputConstraint(json_object=True), 5), plain,
                            _request(pb.OutputConstraint(regex="[0-9]{3}"), 6)])
    for msgs in (mixed[0], mixed[2]):
        assert [t.id for m in msgs for t in m.tokens] == [t.id for m in solo for t in m.tokens]
    assert isinstance(json.loads(_text(mixed[1])), dict)
    assert re.fullmatch("[0-9]{3}", _text(mixed[3])) is not None


def test_regex_choice_and_grammars_are_kept(srv: ServerThread) -> None:
    cases: list[tuple[pb.OutputConstraint, Any]] = [
        (pb.OutputConstraint(regex=r"\d{4}-\d{2}-\d{2}"), re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")),
        (pb.OutputConstraint(regex="(cat|dog)s? [a-z]{1,5}"), re.compile("(cat|dog)s? [a-z]{1,5}")),
        (pb.OutputConstraint(choice=pb.Choices(choices=["positive", "negative", "neutral"])),
         {"positive", "negative", "neutral"}),
        (pb.OutputConstraint(grammar='start: "(" expr ")"\nexpr: NUM ("+" NUM)*\nNUM: /[0-9]{1,3}/'),
         re.compile(r"\([0-9]{1,3}(\+[0-9]{1,3})*\)")),
        (pb.OutputConstraint(grammar='root ::= answer\nanswer ::= "yes" | "no"'), {"yes", "no"}),  # GBNF
    ]
    reqs = [_request(c, seed) for c, _ in cases for seed in SEEDS]
    results = _generate(srv, reqs)
    for i, msgs in enumerate(results):
        expect = cases[i // len(SEEDS)][1]
        text = _text(msgs)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN, text
        assert (text in expect) if isinstance(expect, set) else (expect.fullmatch(text) is not None), text


def test_deltas_stay_byte_exact_under_a_constraint(srv: ServerThread, tok: Tokenizer) -> None:
    msgs = _generate(srv, [_request(pb.OutputConstraint(json_schema=json.dumps(CORPUS[9])), 7)])[0]
    ids = [t.id for m in msgs for t in m.tokens if t.id not in srv.engine.info.eos_token_ids]
    assert _text(msgs) == tok.decode(ids)


def test_a_stream_cut_by_max_tokens_says_so(srv: ServerThread) -> None:
    msgs = _generate(srv, [_request(pb.OutputConstraint(json_schema=json.dumps(CORPUS[18])), 1, max_new=3)])[0]
    assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    with pytest.raises(json.JSONDecodeError):
        json.loads(_text(msgs))


# -- refusals --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("constraint", "field", "reason"), [
    (pb.OutputConstraint(json_schema="{"), "constraint.json_schema", "not valid JSON"),
    (pb.OutputConstraint(json_schema='{"type": "nope"}'), "constraint.json_schema", "nope"),
    (pb.OutputConstraint(regex="a(b"), "constraint.regex", "unclosed group"),
    (pb.OutputConstraint(grammar="start: foo"), "constraint.grammar", "foo"),
    (pb.OutputConstraint(grammar="root ::= missing"), "constraint.grammar", "missing"),
    (pb.OutputConstraint(choice=pb.Choices()), "constraint.choice", "at least one"),
    (pb.OutputConstraint(), "constraint", "set one of"),
])
def test_a_constraint_that_cannot_be_compiled_is_invalid_argument_naming_the_field(
    stub: Any, constraint: pb.OutputConstraint, field: str, reason: str,
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(pb.GenerateRequest(prompt="hi", constraint=constraint), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details() and reason in err.value.details(), err.value.details()


def test_hostile_constraints_are_refused_or_bounded(tok: Tokenizer, srv: ServerThread) -> None:
    """Each compiles within the compiler's fuel and state limits, or is refused with its reason; what compiles gives
    a valid first mask. (The pytest timeout bounds the time: nothing here may run away.)"""
    llt = ll_tokenizer(tok, srv.engine.info.vocab_size, srv.engine.info.eos_token_ids)
    refused: list[str] = []
    for kind, value in [*HOSTILE, ("json_schema", json.dumps(_nest(200)))]:
        try:
            compiled = compile_constraint(kind, value, llt)
        except ConstraintError as exc:
            refused.append(str(exc))
            continue
        masks = MaskBatch([compiled.start()], srv.engine.info.vocab_size)
        first = masks.start().masks()[0]
        assert first is not None
    assert all(refused), refused  # each refusal says why


def test_min_new_tokens_with_a_constraint_is_refused(stub: Any) -> None:
    req = _request(pb.OutputConstraint(json_object=True), 1)
    req.stopping.min_new_tokens = 2
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Generate(req, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_new_tokens" in err.value.details()


@pytest.fixture
def stub(srv: ServerThread) -> Iterator[Any]:
    with srv.channel() as ch:
        yield pb_grpc.GenerationServiceStub(ch)


# -- the HTTP front ---------------------------------------------------------------------------------------------


def _client(srv: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(srv) + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "user", "content": "Give me a person as JSON."}]


@pytest.mark.parametrize("seed", SEEDS)
def test_response_format_json_schema_validates(srv: ServerThread, seed: int) -> None:
    schema = CORPUS[1]
    out = _client(srv).chat.completions.create(
        model=srv.engine.info.name, messages=CHAT, seed=seed, max_tokens=BUDGET,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    assert out.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(out.choices[0].message.content or ""), schema)


def test_response_format_json_object_streams_byte_exact_deltas(srv: ServerThread) -> None:
    stream = _client(srv).chat.completions.create(
        model=srv.engine.info.name, messages=CHAT, seed=4, max_tokens=BUDGET, stream=True,  # type: ignore[arg-type]
        response_format={"type": "json_object"})
    parts, finish = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop"
    assert isinstance(json.loads("".join(parts)), dict)


@pytest.mark.parametrize(("structured", "check"), [
    ({"choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
    ({"regex": "[A-Z]{2}-[0-9]{3}"}, lambda t: re.fullmatch("[A-Z]{2}-[0-9]{3}", t) is not None),
    ({"json": CORPUS[5]}, lambda t: json.loads(t)["color"] in ("red", "green", "blue")),
    ({"grammar": 'start: "x" "y"+'}, lambda t: re.fullmatch("xy+", t) is not None),
])
def test_vllm_structured_outputs_on_both_endpoints(srv: ServerThread, structured: dict[str, Any], check: Any) -> None:
    client = _client(srv)
    chat = client.chat.completions.create(model=srv.engine.info.name, messages=CHAT, seed=3,  # type: ignore[arg-type]
                                          max_tokens=BUDGET, extra_body={"structured_outputs": structured})
    assert check(chat.choices[0].message.content) is True, chat.choices[0].message.content
    text = client.completions.create(model=srv.engine.info.name, prompt="Answer:", seed=3, max_tokens=BUDGET,
                                     extra_body={"structured_outputs": structured}).choices[0].text
    assert check(text) is True, text


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"choice": ["a"], "regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"guided_json": {}}}, "structured_outputs.guided_json"),
    ({"guided_json": {"type": "object"}}, "guided_json"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tool_choice"),
])
def test_http_refusals_name_the_parameter(srv: ServerThread, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        _client(srv).chat.completions.create(model=srv.engine.info.name, messages=CHAT,  # type: ignore[arg-type]
                                             extra_body=body)
    assert err.value.status_code == 400
    assert param in str(err.value.body), err.value.body


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": obj({"city": S, "unit": {"enum": ["c", "f"]}})}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": obj({"zone": {"enum": ["utc", "cet"]}})}}


@pytest.mark.parametrize(("tools", "choice"), [
    ([WEATHER], "required"),
    ([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}),
    ([WEATHER, TIME], "required"),
])
@pytest.mark.parametrize("seed", SEEDS)
def test_tool_calls_stream_as_openai_fragments_that_the_sdk_assembles(
    srv: ServerThread, tools: list[dict[str, Any]], choice: Any, seed: int,
) -> None:
    client = _client(srv)
    kwargs: dict[str, Any] = {"model": srv.engine.info.name, "messages": CHAT, "tools": tools, "tool_choice": choice,
                              "seed": seed, "max_tokens": BUDGET}
    with client.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    whole = client.chat.completions.create(**kwargs)
    for completion in (final, whole):
        choice0 = completion.choices[0]
        assert choice0.finish_reason == "tool_calls"
        (call,) = choice0.message.tool_calls or []
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        assert call.function.name in schemas  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])  # type: ignore[union-attr]
        assert call.id.startswith("call_")
    streamed, returned = (c.choices[0].message.tool_calls[0].function for c in (final, whole))  # type: ignore[index]
    assert (streamed.name, streamed.arguments) == (returned.name, returned.arguments)  # type: ignore[union-attr]


# -- the engine: a preempted constrained sequence keeps its matcher in step --------------------------------------


def test_a_preempted_constrained_stream_keeps_its_matchers_state(model_dir: Path) -> None:
    from tests.support.callers import TOKENS, Reader, as_caller
    from tests.support.hooks import StepGate

    gate = StepGate()
    s = started(base_config(model_dir, max_slots=4, max_queue=8, auth_tokens=TOKENS), hooks=gate)
    schema = CORPUS[18]
    try:
        with s.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            reqs = [_request(pb.OutputConstraint(json_schema=json.dumps(schema)), seed, f"request {seed}")
                    for seed in range(8)]
            gate.close()
            a = [Reader(stub.Generate(r, metadata=as_caller("a"), timeout=300)) for r in reqs]
            assert s.engine.wait_until(lambda st: st.active == 4 and st.waiting == 4, 60)
            gate.permit(3)  # a few constrained tokens each
            b = Reader(stub.Generate(_request(pb.OutputConstraint(json_object=True), 9), metadata=as_caller("b"),
                                     timeout=300))
            assert s.engine.wait_until(lambda st: st.preemptions >= 1, 60)
            gate.open()
            for r in [*a, b]:
                r.join()
    finally:
        s.close()
    for r in a:
        assert r.msgs[-1].finish_reason == pb.FINISH_REASON_EOS_TOKEN, _text(r.msgs)
        jsonschema.validate(json.loads(_text(r.msgs)), schema)
    assert isinstance(json.loads(_text(b.msgs)), dict)


def test_the_mask_is_applied_to_constrained_rows_only() -> None:
    from service.engine.constraints import apply_mask

    mask = np.zeros(2, dtype=np.int32)
    mask[0] = 0b101  # ids 0 and 2
    row = np.arange(40, dtype=np.float64)
    apply_mask(row, mask)
    assert np.isfinite(row).nonzero()[0].tolist() == [0, 2]


# -- the SDK and the CLI ----------------------------------------------------------------------------------------


def test_the_sdk_takes_json_schema_and_choice(srv: ServerThread) -> None:
    from tokenstream_client import Client

    schema = CORPUS[1]
    with Client(srv.target) as client:
        out = client.generate("A person:", json_schema=schema, temperature=1.0, seed=2, max_new_tokens=BUDGET,
                              timeout=120).collect()
        picked = client.generate("Sentiment:", choice=["good", "bad"], temperature=1.0, seed=2,
                                 timeout=120).collect()
        with pytest.raises(TypeError, match="at most one"):
            client.generate("x", regex="a", choice=["a"])
    assert out.finish_reason == "EOS_TOKEN"
    jsonschema.validate(json.loads(out.text), schema)
    assert picked.text in ("good", "bad")


def test_the_cli_takes_structured_output_flags(srv: ServerThread, tmp_path: Path) -> None:
    import io

    from tokenstream_client.cli import main

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(CORPUS[5]))
    for flags, check in [
        (["--json-schema", f"@{schema_file}"], lambda t: json.loads(t)["color"] in ("red", "green", "blue")),
        (["--regex", "[0-9]{2}"], lambda t: re.fullmatch("[0-9]{2}", t) is not None),
        (["--choice", "up", "--choice", "down"], lambda t: t in ("up", "down")),
        (["--grammar", 'root ::= "a" | "b"'], lambda t: t in ("a", "b")),
    ]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["generate", "--target", srv.target, "--temperature", "1", "--seed", "1",
                     "--max-new-tokens", str(BUDGET), "--no-status", *flags, "Answer:"], stdout=out, stderr=err)
        assert code == 0, err.getvalue()
        assert check(out.getvalue().rstrip("\n")) is True, (flags, out.getvalue())
