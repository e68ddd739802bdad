"""OpenAI JSON in, the shared GenerateParams out.

Only the OpenAI shape is checked here (JSON types, parameters this server refuses, `n`, `stream`, `model`).
Every range, limit and default of the request itself is checked by the one request model both fronts share
(service/validation.py), whose field paths `Parsed.param_name` spells the OpenAI way.

Unset sampling parameters take the model's recommended values (GetModelInfo.recommended_sampling, from its
generation_config), else OpenAI's documented defaults (temperature 1, top_p 1): an OpenAI client that sets nothing
samples, as it would elsewhere. `temperature: 0` is greedy. The defaults are this front's
(`openai_sampling_defaults`, declared on its Front); the shared lifecycle applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.engine.api import ModelInfo
from service.errors import FieldViolation, InvalidRequestError, ModelNotFoundError
from service.validation import GenerateParams, Message, Sampling, recommended_sampling

# OpenAI's documented default: a client that sets nothing samples, as it would elsewhere.
OPENAI_SAMPLING = Sampling(temperature=1.0)

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
    params: GenerateParams
    stream: bool = False
    include_usage: bool = False  # a last chunk with usage (stream_options.include_usage)
    continuous_usage: bool = False  # usage on every chunk (stream_options.continuous_usage_stats, as vLLM)
    max_tokens_name: str = "max_tokens"  # or max_completion_tokens, as the caller spelled it

    @property
    def logprobs(self) -> bool:
        return self.params.logprobs

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


def openai_sampling_defaults(info: ModelInfo) -> Sampling:
    """Unset sampling parameters on this front: the model's recommendation, else OpenAI's temperature 1."""
    return (recommended_sampling(info.generation_defaults) or Sampling()).over(OPENAI_SAMPLING)


def parse_chat(body: Any, served_model: str) -> Parsed:
    """POST /v1/chat/completions -> GenerateParams with messages; InvalidRequestError naming every bad param."""
    r = _reader(body, CHAT_PARAMS)
    request = GenerateParams()
    messages = r.body.get("messages")
    if not isinstance(messages, list) or not messages:
        r.violation("messages", "must be a non-empty array of {role, content} objects")
    else:
        request.messages = tuple(_message(r, i, message) for i, message in enumerate(messages))
    both = r.body.get("max_tokens") is not None and r.body.get("max_completion_tokens") is not None
    if both:
        r.violation("max_completion_tokens", "set max_tokens or max_completion_tokens, not both")
    max_name = "max_completion_tokens" if r.body.get("max_completion_tokens") is not None else "max_tokens"
    request.max_new_tokens = r.integer(max_name)
    logprobs = r.boolean("logprobs")
    top = r.integer("top_logprobs")
    if top is not None:
        if top >= 0 and not logprobs:
            r.violation("top_logprobs", "needs logprobs: true")
        request.top_n = top
    request.logprobs = bool(logprobs)
    r.refuse_unless("response_format", [{"type": "text"}], "only {\"type\": \"text\"} is supported")
    r.refuse_unless("tools", [[]], "tools are not supported")
    r.refuse_unless("tool_choice", ["none"], "tools are not supported")
    r.refuse_unless("parallel_tool_calls", [False, True], "must be true or false")
    return _finish(r, True, request, served_model, max_name)


def parse_completion(body: Any, served_model: str) -> Parsed:
    """POST /v1/completions -> GenerateParams with a prompt; InvalidRequestError naming every bad param."""
    r = _reader(body, COMPLETION_PARAMS)
    request = GenerateParams()
    prompt = r.body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        r.violation("prompt", "token-id prompts are not supported; send the text")
    else:
        r.violation("prompt", "must be a string (one prompt per request)")
    request.max_new_tokens = r.integer("max_tokens")
    logprobs = r.integer("logprobs")
    if logprobs is not None:  # the number of alternatives per token
        request.logprobs = True
        request.top_n = logprobs
    r.refuse_unless("echo", [False], "echo is not supported")
    r.refuse_unless("suffix", [""], "suffix is not supported")
    r.refuse_unless("best_of", [1], "must be 1")
    return _finish(r, False, request, served_model, "max_tokens")


def _reader(body: Any, known: frozenset[str]) -> _Reader:
    if not isinstance(body, dict):
        raise InvalidRequestError([FieldViolation("body", "the request body must be a JSON object")])
    r = _Reader(body)
    for name in body:
        if name not in known:
            r.violation(name, "is not a parameter this server accepts")
    return r


def _message(r: _Reader, i: int, message: Any) -> Message:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        r.violation(where, "must be an object with role and content")
        return Message("", "")
    for name in message:
        if name not in ("role", "content"):
            r.violation(f"{where}.{name}", "is not supported (messages have role and content)")
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
    return Message(role, text)


def _finish(r: _Reader, chat: bool, request: GenerateParams, served_model: str, max_name: str) -> Parsed:
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
    request.sampling = _sampling(r)
    stop = r.body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    if stop is not None and not isinstance(stop, (str, list)):
        r.violation("stop", "must be a string or an array of strings")
    for i, s in enumerate(stops):
        if not isinstance(s, str):
            r.violation(f"stop[{i}]", "must be a string")
    request.stop_sequences = tuple(s for s in stops if isinstance(s, str))
    request.min_new_tokens = r.integer("min_tokens") or 0
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
        request.echo_prompt_tokens = True  # the first chunk's prompt ids give usage.prompt_tokens
    if r.bad:
        raise InvalidRequestError(r.bad)
    if model is not None and model != served_model:
        raise ModelNotFoundError([FieldViolation("model", f"{model!r} is not served here; this server serves "
                                                          f"{served_model!r} (GET /v1/models)")])
    return Parsed(chat, request, stream, include_usage, continuous, max_name)


def _sampling(r: _Reader) -> Sampling:
    """The sampling parameters the request sets, vLLM's top_k and repetition_penalty included."""
    return Sampling(temperature=r.number("temperature"), top_p=r.number("top_p"), top_k=r.integer("top_k"),
                    repetition_penalty=r.number("repetition_penalty"), seed=r.integer("seed"))
