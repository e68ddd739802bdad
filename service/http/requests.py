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
from service.validation import ConstraintSpec, GenerateParams, Message, Sampling, recommended_sampling

# OpenAI's documented default: a client that sets nothing samples, as it would elsewhere.
OPENAI_SAMPLING = Sampling(temperature=1.0)

_COMMON = frozenset({
    "model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "seed", "stop", "logprobs", "n",
    "user", "frequency_penalty", "presence_penalty", "logit_bias",
    # Extensions that vLLM's OpenAI server also accepts, with the same meaning.
    "top_k", "repetition_penalty", "min_tokens", "structured_outputs", "cache_salt",
})
CHAT_PARAMS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                         "tool_choice", "parallel_tool_calls"}
COMPLETION_PARAMS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


@dataclass(frozen=True)
class ToolCall:
    """A chat request whose answer must be a function call (`tools` with `tool_choice` "required" or a named
    function). With one function the output is its arguments; with several it is {"name": ..., "arguments": ...},
    in the constraint's fixed JSON layout, and the responder takes the name from its start."""

    names: tuple[str, ...]

    @property
    def wrapped(self) -> bool:
        return len(self.names) > 1


STRUCTURED_OUTPUT_KINDS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
                           "grammar": "grammar"}


@dataclass(frozen=True)
class Parsed:
    """One OpenAI request, translated."""

    chat: bool
    params: GenerateParams
    stream: bool = False
    include_usage: bool = False  # a last chunk with usage (stream_options.include_usage)
    continuous_usage: bool = False  # usage on every chunk (stream_options.continuous_usage_stats, as vLLM)
    max_tokens_name: str = "max_tokens"  # or max_completion_tokens, as the caller spelled it
    tool_call: ToolCall | None = None  # the output is a call of one of these functions, sent as tool_calls


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
    request.constraint = _response_format(r)
    tool_call = _tools(r, request)
    r.refuse_unless("parallel_tool_calls", [False, True], "must be true or false")
    return _finish(r, True, request, served_model, max_name, tool_call)


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


def _response_format(r: _Reader) -> ConstraintSpec | None:
    """OpenAI's response_format: text (none), json_object, or json_schema (`strict` or not: it is always kept)."""
    fmt = r.get("response_format", (dict,), "an object")
    if fmt is None:
        return None
    kind = fmt.get("type")
    if kind == "text" and len(fmt) == 1:
        return None
    if kind == "json_object" and len(fmt) == 1:
        return ConstraintSpec("json_object", True, "response_format")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            r.violation("response_format.json_schema.schema", "must be an object: the JSON schema")
            return None
        for key, value in spec.items():
            if key not in ("name", "description", "schema", "strict"):
                r.violation(f"response_format.json_schema.{key}", "is not a json_schema member")
            elif key == "strict" and value is not None and not isinstance(value, bool):
                r.violation("response_format.json_schema.strict", "must be true or false")
        return ConstraintSpec("json_schema", spec["schema"], "response_format.json_schema.schema")
    r.violation("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                   '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}')
    return None


def _structured_outputs(r: _Reader) -> ConstraintSpec | None:
    """vLLM's structured_outputs object: exactly one of json, json_object, regex, choice or grammar."""
    so = r.get("structured_outputs", (dict,), "an object")
    if so is None:
        return None
    for key in so:
        if key not in STRUCTURED_OUTPUT_KINDS:
            r.violation(f"structured_outputs.{key}", "is not supported; use one of json, json_object, regex, "
                                                     "choice or grammar")
    given = [key for key in STRUCTURED_OUTPUT_KINDS if so.get(key) not in (None, False)]
    if len(given) != 1:
        r.violation("structured_outputs", "set exactly one of json, json_object, regex, choice or grammar")
        return None
    key = given[0]
    value, where = so[key], f"structured_outputs.{key}"
    kinds = {"json": (dict, str), "json_object": (bool,), "regex": (str,), "choice": (list,), "grammar": (str,)}
    if not isinstance(value, kinds[key]) or (isinstance(value, list) and not all(isinstance(c, str) for c in value)):
        what = {"json": "a JSON schema (an object, or its JSON text)", "json_object": "true",
                "regex": "a string", "choice": "an array of strings", "grammar": "a string"}[key]
        r.violation(where, f"must be {what}")
        return None
    return ConstraintSpec(STRUCTURED_OUTPUT_KINDS[key], value, where)


def _tools(r: _Reader, request: GenerateParams) -> ToolCall | None:
    """`tools` with tool_choice "required" or a named function: the output is constrained to a call (its arguments
    to the function's parameter schema). "none" ignores the tools; "auto" is refused (the model may not choose)."""
    tools = r.get("tools", (list,), "an array of function tools")
    choice = r.body.get("tool_choice")
    if not tools:
        if choice not in (None, "none"):
            r.violation("tool_choice", "needs tools")
        return None
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        params = fn.get("parameters", {"type": "object"}) if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name or not isinstance(params, dict):
            r.violation(f"tools[{i}]", 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
        elif name in functions:
            r.violation(f"tools[{i}].function.name", f"{name!r} is named twice")
        else:
            functions[name] = params
    if choice == "none" or not functions:
        return None
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or named not in functions:
            r.violation("tool_choice", "must name one of the tools: {\"type\": \"function\", \"function\": "
                                       "{\"name\": ...}}")
            return None
        functions = {named: functions[named]}
    elif choice != "required":
        # "auto", OpenAI's default with tools: the model would choose between text and a call, which needs a
        # model-specific tool-call parser this server does not have.
        r.violation("tools" if choice is None else "tool_choice",
                    'tools need tool_choice "required" or a named function ("auto", the default, is not supported)')
        return None
    if request.constraint is not None:
        r.violation("response_format", "cannot be combined with a required tool call")
        return None
    names = tuple(functions)
    if len(names) == 1:
        request.constraint = ConstraintSpec("json_schema", functions[names[0]],
                                            f"tools[{[_tool_name(t) for t in tools].index(names[0])}].function"
                                            ".parameters")
    else:
        schema = {"anyOf": [{"type": "object", "properties": {"name": {"const": n}, "arguments": p},
                             "required": ["name", "arguments"], "additionalProperties": False}
                            for n, p in functions.items()]}
        request.constraint = ConstraintSpec("json_schema", schema, "tools")
    return ToolCall(names)


def _tool_name(tool: Any) -> Any:
    fn = tool.get("function") if isinstance(tool, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None


def _finish(r: _Reader, chat: bool, request: GenerateParams, served_model: str, max_name: str,
            tool_call: ToolCall | None = None) -> Parsed:
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
    request.cache_salt = r.get("cache_salt", (str,), "a string") or ""
    for name in ("frequency_penalty", "presence_penalty"):
        value = r.number(name)
        if value:
            r.violation(name, "is not supported; use repetition_penalty")
    logit_bias = r.get("logit_bias", (dict,), "an object")
    if logit_bias:
        r.violation("logit_bias", "is not supported")
    if continuous:
        request.echo_prompt_tokens = True  # the first chunk's prompt ids give usage.prompt_tokens
    if (structured := _structured_outputs(r)) is not None:
        if request.constraint is not None:
            r.violation("structured_outputs", "set structured_outputs or response_format (or tools), not both")
        request.constraint = structured
    if r.bad:
        raise InvalidRequestError(r.bad)
    if model is not None and model != served_model:
        raise ModelNotFoundError([FieldViolation("model", f"{model!r} is not served here; this server serves "
                                                          f"{served_model!r} (GET /v1/models)")])
    return Parsed(chat, request, stream, include_usage, continuous, max_name, tool_call)


def _sampling(r: _Reader) -> Sampling:
    """The sampling parameters the request sets, vLLM's top_k and repetition_penalty included."""
    return Sampling(temperature=r.number("temperature"), top_p=r.number("top_p"), top_k=r.integer("top_k"),
                    repetition_penalty=r.number("repetition_penalty"), seed=r.integer("seed"))
