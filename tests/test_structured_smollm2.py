"""Structured output on the real SmolLM2-135M-Instruct, end to end: what a backend asks of it (a JSON object that
validates, one label out of a list, a date, a tool call) comes back valid through both fronts, greedy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.support.http_front import base_url
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30}}}


@pytest.fixture(scope="module")
def smollm2() -> Iterator[ServerThread]:
    srv = started(base_config("default", http_port=-1, max_context=1024, max_new_tokens=128))
    yield srv
    srv.close()


def chat(srv: ServerThread, question: str, constraint: pb.OutputConstraint) -> tuple[str, Any]:
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=question)], constraint=constraint,
                                 stopping=pb.StoppingCriteria(max_new_tokens=128))
    with srv.channel() as ch:
        msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(request, timeout=300))
    return "".join(m.text for m in msgs), msgs[-1].finish_reason


def test_a_json_schema_answer_validates(smollm2: ServerThread) -> None:
    text, finish = chat(smollm2, "What is the capital of France? Answer in JSON.",
                        pb.OutputConstraint(json_schema=json.dumps(CITY)))
    assert finish == pb.FINISH_REASON_EOS_TOKEN, text
    jsonschema.validate(json.loads(text), CITY)
    print(f"\nSmolLM2 (json_schema): {text}")


def test_a_choice_and_a_regex_are_kept(smollm2: ServerThread) -> None:
    labels = ["positive", "negative", "neutral"]
    text, finish = chat(smollm2, "Classify the sentiment of: 'I love this phone, it is great!'",
                        pb.OutputConstraint(choice=pb.Choices(choices=labels)))
    assert finish == pb.FINISH_REASON_EOS_TOKEN and text in labels, text
    date, finish = chat(smollm2, "On what date did the Apollo 11 crew land on the Moon?",
                        pb.OutputConstraint(regex=r"\d{4}-\d{2}-\d{2}"))
    assert finish == pb.FINISH_REASON_EOS_TOKEN and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", date), date
    print(f"\nSmolLM2 (choice): {text}; (regex): {date}")


def test_openai_response_format_and_a_tool_call(smollm2: ServerThread) -> None:
    sdk = openai.OpenAI(base_url=base_url(smollm2) + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = sdk.models.list().data[0].id
    answer = sdk.chat.completions.create(
        model=model, temperature=0, max_tokens=128,
        messages=[{"role": "user", "content": "What is the capital of Italy? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), CITY)
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
               "required": ["city"], "additionalProperties": False}
    call = sdk.chat.completions.create(
        model=model, temperature=0, max_tokens=128,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": {"name": "get_weather", "parameters": weather}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (tool,) = call.choices[0].message.tool_calls or []
    assert call.choices[0].finish_reason == "tool_calls" and tool.function.name == "get_weather"
    jsonschema.validate(json.loads(tool.function.arguments), weather)
    print(f"\nSmolLM2 (response_format): {answer.choices[0].message.content}; (tool): {tool.function.arguments}")
