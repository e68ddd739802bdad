"""Building a GenerateRequest from keyword arguments."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

from tokenstream.v1 import generation_pb2 as pb

ChatMessages = Sequence[Mapping[str, str] | tuple[str, str]]


class GenerateParams(TypedDict, total=False):
    """What a generate call may set; every field is optional and unset ones take the server's defaults."""

    messages: ChatMessages  # chat turns instead of a prompt: {"role": ..., "content": ...} or (role, content)
    max_new_tokens: int
    min_new_tokens: int
    temperature: float  # unset or 0: greedy
    top_k: int
    top_p: float
    seed: int
    repetition_penalty: float
    stop: Iterable[str]  # stop sequences
    include_stop_sequence: bool
    time_limit_ms: int  # soft limit: the stream ends normally with TIME_LIMIT
    logprobs: bool
    top_n: int
    echo_prompt_tokens: bool
    # Structured output, at most one: the text is an instance of this JSON schema (a dict or its JSON text), any JSON
    # object, a full match of this regex, exactly one of these strings, or in this Lark / GBNF grammar.
    json_schema: Mapping[str, Any] | str
    json_object: bool
    regex: str
    choice: Sequence[str]
    grammar: str


CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")


def build_generate_request(prompt: str | None = None, **params: Unpack[GenerateParams]) -> pb.GenerateRequest:
    """A GenerateRequest from a prompt (or `messages=`) and GenerateParams keywords."""
    unknown = set(params) - set(GenerateParams.__annotations__)
    if unknown:
        raise TypeError(f"unknown generate parameter(s): {', '.join(sorted(unknown))}")
    req = pb.GenerateRequest(prompt=prompt or "")
    for m in params.get("messages") or ():
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        req.messages.add(role=role, content=content)
    s = req.sampling
    if (temperature := params.get("temperature")) is not None:
        s.temperature = temperature
    if (seed := params.get("seed")) is not None:
        s.seed = seed
    s.top_k = params.get("top_k") or 0
    s.top_p = params.get("top_p") or 0.0
    s.repetition_penalty = params.get("repetition_penalty") or 0.0
    st = req.stopping
    if (max_new := params.get("max_new_tokens")) is not None:
        st.max_new_tokens = max_new
    if (time_limit := params.get("time_limit_ms")) is not None:
        st.time_limit_ms = time_limit
    st.min_new_tokens = params.get("min_new_tokens") or 0
    stop = params.get("stop") or ()
    st.stop_sequences.extend([stop] if isinstance(stop, str) else list(stop))
    st.include_stop_sequence = params.get("include_stop_sequence", False)
    r = req.response
    r.logprobs = params.get("logprobs", False)
    r.top_n = params.get("top_n") or 0
    r.echo_prompt_tokens = params.get("echo_prompt_tokens", False)
    given = [k for k in CONSTRAINTS if params.get(k) not in (None, False)]
    if len(given) > 1:
        raise TypeError(f"set at most one of {', '.join(CONSTRAINTS)}; got {', '.join(given)}")
    if given:
        c, kind = req.constraint, given[0]
        value: Any = params.get(kind)
        if kind == "json_schema":
            c.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif kind == "json_object":
            c.json_object = True
        elif kind == "choice":
            c.choice.choices.extend([value] if isinstance(value, str) else list(value))
        else:
            setattr(c, kind, value)
    return req
