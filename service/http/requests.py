"""OpenAI JSON in, the service's own GenerateRequest out.

The HTTP front validates only what the gRPC contract cannot express (JSON shape and types, OpenAI parameters this
server refuses, `n`, `stream`, `model`). Everything else (ranges, limits, prompts, messages) is checked by the one
validation layer both fronts share (service/validation.py), whose field paths `Parsed.param_name` spells the OpenAI
way.

Unset sampling parameters take the model's recommended values (GetModelInfo.recommended_sampling, from its
generation_config), else OpenAI's documented defaults (temperature 1, top_p 1): an OpenAI client that sets nothing
samples, as it would elsewhere. `temperature: 0` is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.errors import FieldViolation, InvalidRequestError, ModelNotFoundError
from service.validation import MAX_REPETITION_PENALTY
from tokenstream.v1 import generation_pb2 as pb

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1

_COMMON = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n",
    "user", "frequency_penalty", "presence_penalty", "logit_bias",
    # Extensions that vLLM's OpenAI server also accepts, with the same meaning.
    "top_k", "repetition_penalty", "min_tokens",
})
CHAT_PARAMS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls"}
COMPLETION_PARAMS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


@dataclass(frozen=True)
class Parsed:
    """One OpenAI request, translated."""

    chat: bool
    request: pb.GenerateRequest
    stream: bool = False
    include_usage: bool = False  # a last chunk with usage (stream_options.include_usage)
    continuous_usage: bool = False  # usage on every chunk (stream_options.continuous_usage_stats, as vLLM)
    max_tokens_name: str = "max_tokens"  # or max_completion_tokens, as the caller spelled it

    @property
    def logprobs(self) -> bool:
        return self.request.response.logprobs

    def param_name(self, path: str) -> str | None:
        """A shared-validation field path as this request spells it: "stopping.stop_sequences[1]" -> "stop[1]"."""
        names = {
            "sampling.temperature": "temperature", "sampling.top_p": "top_p", "sampling.top_k": "top_k",
            "sampling.seed": "seed", "sampling.repetition_penalty": "repetition_penalty",
            "stopping.max_new_tokens": self.max_tokens_name, "stopping.min_new_tokens": "min_tokens",
            "stopping.stop_sequences": "stop", "response.logprobs": "logprobs",
            "response.top_n": "top_logprobs" if self.chat else "logprobs", "request": None, "body": None,
        }
        for proto, http in names.items():
            if path == proto or path.startswith((proto + "[", proto + ".")):
                return http + path[len(proto):] if http else None
        return path  # prompt, messages[i].role and the HTTP front's own fields are spelled alike


@dataclass
class _Reader:
    """Typed access to a JSON object's members, collecting every violation instead of stopping at the first."""

    body: dict[str, Any]
    bad: list[FieldViolation] = field(default_factory=list)

    def violation(self, name: str, description: str) -> None:
        self.bad.append(FieldViolation(name, description))

    def get(self, name: str, kinds: tuple[type, ...], what: str) -> Any:
        value = self.body.get(name)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.violation(name, f"must be {what}")
            return None
        return value

    def integer(self, name: str) -> int | None:
        return self.get(name, (int,), "an integer")

    def number(self, name: str) -> float | None:
        value = self.get(name, (int, float), "a number")
        return None if value is None else float(value)

    def boolean(self, name: str) -> bool | None:
        return self.get(name, (bool,), "true or false")

    def refuse_unless(self, name: str, neutral: Sequence[Any], why: str) -> None:
        """An OpenAI parameter this server does not implement: accepted only at its neutral value."""
        value = self.body.get(name)
        if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
            self.violation(name, why)


def parse_chat(body: Any, served_model: str, recommended: pb.SamplingParams | None) -> Parsed:
    """POST /v1/chat/completions -> a GenerateRequest with messages; InvalidRequestError naming every bad param."""
    r = _reader(body, CHAT_PARAMS)
    request = pb.GenerateRequest()
    messages = r.body.get("messages")
    if not isinstance(messages, list) or not messages:
        r.violation("messages", "must be a non-empty array of {role, content} objects")
    else:
        for i, message in enumerate(messages):
            _message(r, i, message, request)
    both = r.body.get("max_tokens") is not None and r.body.get("max_completion_tokens") is not None
    if both:
        r.violation("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
    max_name = "max_completion_tokens" if r.body.get("max_completion_tokens") is not None else "max_tokens"
    _max_tokens(r, max_name, request)
    logprobs = r.boolean("logprobs")
    top = r.integer("top_logprobs")
    if top is not None:
        if top < 0:
            r.violation("top_logprobs", "must be a non-negative integer")
        elif not logprobs:
            r.violation("top_logprobs", "needs logprobs: true")
        request.response.top_n = min(max(top, 0), UINT32_MAX)
    request.response.logprobs = bool(logprobs)
    r.refuse_unless("response_format", [{"type": "text"}], "only {\"type\": \"text\"} is supported")
    r.refuse_unless("tools", [[]], "tools are not supported")
    r.refuse_unless("tool_choice", ["none"], "tools are not supported")
    r.refuse_unless("parallel_tool_calls", [False, True], "must be true or false")
    return _finish(r, True, request, served_model, recommended, max_name)


def parse_completion(body: Any, served_model: str, recommended: pb.SamplingParams | None) -> Parsed:
    """POST /v1/completions -> a GenerateRequest with a prompt; InvalidRequestError naming every bad param."""
    r = _reader(body, COMPLETION_PARAMS)
    request = pb.GenerateRequest()
    prompt = r.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        r.violation("prompt", "token-id prompts are not supported; send the text")
    else:
        r.violation("prompt", "must be a string (one prompt per request)")
    _max_tokens(r, "max_tokens", request)
    logprobs = r.integer("logprobs")
    if logprobs is not None:
        if logprobs < 0:
            r.violation("logprobs", "must be a non-negative integer (the number of alternatives per token)")
        request.response.logprobs = True
        request.response.top_n = min(max(logprobs, 0), UINT32_MAX)
    r.refuse_unless("echo", [False], "echo is not supported")
    r.refuse_unless("suffix", [""], "suffix is not supported")
    r.refuse_unless("best_of", [1], "must be 1")
    return _finish(r, False, request, served_model, recommended, "max_tokens")


def _reader(body: Any, known: frozenset[str]) -> _Reader:
    if not isinstance(body, dict):
        raise InvalidRequestError([FieldViolation("body", "the request body must be a JSON object")])
    r = _Reader(body)
    for name in body:
        if name not in known:
            r.violation(name, "is not a parameter this server accepts")
    return r


def _message(r: _Reader, i: int, message: Any, request: pb.GenerateRequest) -> None:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        r.violation(where, "must be an object with role and content")
        return
    for name in message:
        if name not in ("role", "content", "name"):
            r.violation(f"{where}.{name}", "is not supported (messages have role, content and name)")
    role = message.get("role")
    if not isinstance(role, str):
        r.violation(f"{where}.role", "must be a string")
        role = ""
    content = message.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                r.violation(f"{where}.content[{j}]", "only {\"type\": \"text\", \"text\": ...} parts are supported")
        text = "".join(parts)
    else:
        r.violation(f"{where}.content", "must be a string or an array of text parts")
        text = ""
    request.messages.add(role=role, content=text)


def _max_tokens(r: _Reader, name: str, request: pb.GenerateRequest) -> None:
    value = r.integer(name)
    if value is not None:
        # Out-of-range values are clamped into the field's range, where the shared layer reports them.
        request.stopping.max_new_tokens = min(max(value, 0), UINT32_MAX)


def _finish(r: _Reader, chat: bool, request: pb.GenerateRequest, served_model: str,
            recommended: pb.SamplingParams | None, max_name: str) -> Parsed:
    """The parameters both endpoints share, the defaults, and the verdict."""
    model = r.get("model", (str,), "a string")
    stream = bool(r.boolean("stream"))
    options = r.get("stream_options", (dict,), "an object")
    include_usage = continuous = False
    if options is not None:
        if not stream:
            r.violation("stream_options", "is only allowed with stream: true")
        for key, value in options.items():
            if key not in ("include_usage", "continuous_usage_stats") or not isinstance(value, bool):
                r.violation(f"stream_options.{key}", "only include_usage and continuous_usage_stats, each "
                                                     "true or false, are supported")
        include_usage = options.get("include_usage") is True
        continuous = options.get("continuous_usage_stats") is True
    _sampling(r, request.sampling, recommended)
    stop = r.body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stop is not None and not isinstance(stop, (str, list)):
        r.violation("stop", "must be a string or an array of strings")
    for i, s in enumerate(stops):
        if isinstance(s, str):
            request.stopping.stop_sequences.append(s)
        else:
            r.violation(f"stop[{i}]", "must be a string")
    min_tokens = r.integer("min_tokens")
    if min_tokens is not None:
        if min_tokens < 0:
            r.violation("min_tokens", "must be a non-negative integer")
        request.stopping.min_new_tokens = min(max(min_tokens, 0), UINT32_MAX)
    n = r.integer("n")
    if n is not None and n != 1:
        r.violation("n", "must be 1: one choice per request")
    r.get("user", (str,), "a string")
    for name in ("frequency_penalty", "presence_penalty"):
        value = r.number(name)
        if value:
            r.violation(name, "is not supported; use repetition_penalty")
    logit_bias = r.get("logit_bias", (dict,), "an object")
    if logit_bias:
        r.violation("logit_bias", "is not supported")
    if continuous:
        request.response.echo_prompt_tokens = True  # the first chunk's prompt ids give usage.prompt_tokens
    if r.bad:
        raise InvalidRequestError(r.bad)
    if model is not None and model != served_model:
        raise ModelNotFoundError([FieldViolation("model", f"{model!r} is not served here; this server serves "
                                                          f"{served_model!r} (GET /v1/models)")])
    return Parsed(chat, request, stream, include_usage, continuous, max_name)


def _sampling(r: _Reader, s: pb.SamplingParams, recommended: pb.SamplingParams | None) -> None:
    rec = recommended or pb.SamplingParams()
    temperature = r.number("temperature")
    if temperature is not None:
        s.temperature = temperature
    else:
        s.temperature = rec.temperature if rec.HasField("temperature") else 1.0
    top_p = r.number("top_p")
    if top_p is not None and top_p <= 0.0:
        r.violation("top_p", "must be in (0, 1]")  # 0 means "unset" in the contract, so it is caught here
    s.top_p = top_p if top_p is not None else rec.top_p
    top_k = r.integer("top_k")
    if top_k is not None and top_k < -1:
        r.violation("top_k", "must be a positive integer, or 0 or -1 for no limit")
    s.top_k = min(max(top_k, 0), UINT32_MAX) if top_k is not None else rec.top_k
    penalty = r.number("repetition_penalty")
    if penalty is not None and penalty <= 0.0:
        r.violation("repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}]")
    s.repetition_penalty = penalty if penalty is not None else rec.repetition_penalty
    seed = r.integer("seed")
    if seed is not None:
        if 0 <= seed <= UINT64_MAX:
            s.seed = seed
        else:
            r.violation("seed", f"must be in [0, {UINT64_MAX}]")
