"""The one request model: both fronts parse into `GenerateParams`, and every range check and default is here."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, fields

from service.config import Config
from service.engine.api import EngineClient, Tokenizing
from service.engine.constraints import CompiledConstraint, ConstraintError, compile_constraint, ll_tokenizer
from service.engine.types import GenerationRequest, SamplingOptions
from service.errors import FieldViolation, InvalidRequestError

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
ROLES = ("system", "user", "assistant")
TOOL_ROLE = "tool"  # accepted where the model's chat template handles it
_TEMPLATE_USES_TOOL = re.compile(r"""['"]tool['"]""")


def chat_roles(chat_template: str | None) -> tuple[str, ...]:
    """The roles a message may have: the three every chat template knows, and `tool` where the template names it.
    Any other role is refused: a template writes the role verbatim between its own control tokens."""
    return ROLES + ((TOOL_ROLE,) if chat_template and _TEMPLATE_USES_TOOL.search(chat_template) else ())


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters as a caller (or a model's recommendation) gave them; None is unset."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def over(self, defaults: Sampling) -> Sampling:
        """These parameters, with `defaults` for the unset ones."""
        return Sampling(**{f.name: getattr(defaults, f.name) if getattr(self, f.name) is None
                           else getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class ConstraintSpec:
    """A structured-output constraint as a caller gave it: `kind` is one of constraints.KINDS; `value` the schema
    (JSON text or object), True (json_object), the regex, the choices or the grammar text; `field` names it in
    errors, as the front spells it."""

    kind: str
    value: object
    field: str


@dataclass
class GenerateParams:
    """One Generate request whichever front it came through, unchecked (a front fills it as it parses). Field paths
    in errors are the gRPC contract's ("sampling.top_p"); the HTTP front spells them the OpenAI way."""

    prompt: str = ""  # "" is unset; set one of prompt, messages and prompt_ids
    messages: tuple[Message, ...] = ()
    prompt_ids: tuple[int, ...] | None = None  # a prompt the caller tokenized itself (vLLM's contract)
    sampling: Sampling = Sampling()
    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    time_limit_ms: int | None = None
    stop_sequences: tuple[str, ...] = ()
    include_stop_sequence: bool = False
    logprobs: bool = False
    top_n: int = 0
    echo_prompt_tokens: bool = False
    constraint: ConstraintSpec | None = None
    cache_salt: str = ""  # prefix reuse: only requests with the same salt share kept K/V


def recommended_sampling(defaults: dict[str, object]) -> Sampling | None:
    """A model's generation_config-style defaults; None when it recommends no sampling."""
    if not defaults.get("do_sample", "temperature" in defaults):
        return None
    kinds = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float}
    return Sampling(**{key: kind(value) for key, kind in kinds.items()
                       if isinstance(value := defaults.get(key), (int, float)) and not isinstance(value, bool)})


def _float32(x: float) -> float:
    # The gRPC contract carries float32: both fronts hand the engine the same number for the same request.
    return float(struct.unpack("f", struct.pack("f", x))[0])


def _check_sampling(s: Sampling, bad: list[FieldViolation]) -> SamplingOptions:
    temperature = 0.0 if s.temperature is None else s.temperature
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        bad.append(FieldViolation("sampling.temperature", f"must be 0 (greedy) or in (0, {MAX_TEMPERATURE:g}]"))
    top_p = 1.0 if s.top_p is None else s.top_p
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        bad.append(FieldViolation("sampling.top_p", "must be in (0, 1]"))
    top_k = 0 if s.top_k is None else s.top_k
    if top_k < -1:
        bad.append(FieldViolation("sampling.top_k", "must be a positive integer, or 0 or -1 for no limit"))
    penalty = 1.0 if s.repetition_penalty is None else s.repetition_penalty
    if not math.isfinite(penalty) or not 0.0 < penalty <= MAX_REPETITION_PENALTY:
        bad.append(FieldViolation("sampling.repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}]"))
    if s.seed is not None and not 0 <= s.seed <= UINT64_MAX:
        bad.append(FieldViolation("sampling.seed", f"must be in [0, {UINT64_MAX}]"))
    if bad:
        return SamplingOptions()
    # top_k -1 and 0 both mean no limit; beyond the contract's uint32 a limit means the same as at its top.
    return SamplingOptions(temperature=_float32(temperature), top_k=min(max(top_k, 0), UINT32_MAX),
                           top_p=_float32(top_p), seed=s.seed, repetition_penalty=_float32(penalty))


def max_new_tokens_limit(cfg: Config, max_context: int) -> int:
    """The most tokens a request may ask for: the configured limit, capped at the context less one prompt token."""
    return max(1, min(cfg.max_new_tokens_limit, max_context - 1))


def _check_stopping(p: GenerateParams, cfg: Config, max_context: int,
                    bad: list[FieldViolation]) -> tuple[int, int]:
    limit = max_new_tokens_limit(cfg, max_context)
    max_new = min(cfg.max_new_tokens, limit) if p.max_new_tokens is None else p.max_new_tokens
    if p.max_new_tokens is not None and not 0 < max_new <= limit:
        bad.append(FieldViolation("stopping.max_new_tokens", f"must be in [1, {limit}]"))
    if p.min_new_tokens < 0:
        bad.append(FieldViolation("stopping.min_new_tokens", "must be a non-negative integer"))
    elif p.min_new_tokens > max_new:
        bad.append(FieldViolation("stopping.min_new_tokens", "must not exceed max_new_tokens"))
    time_limit = cfg.max_request_ms if p.time_limit_ms is None else p.time_limit_ms
    if p.time_limit_ms is not None and time_limit <= 0:
        bad.append(FieldViolation("stopping.time_limit_ms", "must be positive; leave it unset for the server maximum"))
    if len(p.stop_sequences) > cfg.max_stop_sequences:
        bad.append(FieldViolation("stopping.stop_sequences", f"at most {cfg.max_stop_sequences} are allowed"))
    for i, stop in enumerate(p.stop_sequences[: cfg.max_stop_sequences]):
        if not stop:
            bad.append(FieldViolation(f"stopping.stop_sequences[{i}]", "must not be empty"))
        elif len(stop) > cfg.max_stop_sequence_chars:
            bad.append(FieldViolation(f"stopping.stop_sequences[{i}]",
                                      f"longer than {cfg.max_stop_sequence_chars} characters"))
    return max_new, min(time_limit, cfg.max_request_ms)


def _prompt_ids(p: GenerateParams, cfg: Config, tok: Tokenizing, vocab_size: int,
                bad: list[FieldViolation]) -> list[int] | None:
    if p.prompt_ids is not None:
        if p.prompt or p.messages:
            bad.append(FieldViolation("prompt_ids", "set either prompt_ids or a prompt, not both"))
        elif any(not 0 <= i < vocab_size for i in p.prompt_ids):
            bad.append(FieldViolation("prompt_ids", f"ids must be below the vocabulary's {vocab_size}"))
        return None if bad else list(p.prompt_ids)
    if p.prompt and p.messages:
        bad.append(FieldViolation("messages", "set either prompt or messages, not both"))
        return None
    if p.messages:
        if len(p.messages) > cfg.max_messages:
            bad.append(FieldViolation("messages", f"at most {cfg.max_messages} messages are allowed"))
            return None
        roles = chat_roles(tok.chat_template)
        for i, m in enumerate(p.messages):
            if not m.role:
                bad.append(FieldViolation(f"messages[{i}].role", "must not be empty"))
            elif m.role not in roles:
                shown = repr(m.role[:32]) + ("..." if len(m.role) > 32 else "")
                bad.append(FieldViolation(f"messages[{i}].role",
                                          f"{shown} is not a role; use one of {', '.join(roles)}"))
        if any(v.field.startswith("messages") for v in bad):
            return None
        if not tok.chat_template:
            bad.append(FieldViolation("messages", "the model has no chat template; send a raw prompt instead"))
            return None
        if bad:
            return None  # don't render or encode a request that is rejected anyway
        # Content never becomes control tokens: a message cannot close its turn and forge another.
        return tok.encode_chat([{"role": m.role, "content": m.content} for m in p.messages])
    if not p.prompt:
        bad.append(FieldViolation("prompt", "must not be empty (or send messages)"))
        return None
    if bad:
        return None
    return tok.encode(p.prompt)


def to_generation_request(p: GenerateParams, cfg: Config, engine: EngineClient,
                          bad: list[FieldViolation] | None = None) -> tuple[GenerationRequest, int]:
    """The engine request and its time limit in ms; InvalidRequestError naming every bad field otherwise
    (`bad` may bring violations found before, in the call's metadata).

    The engine request has no deadline yet: admission sets it from the time limit and the caller's deadline.
    """
    tok, max_context = engine.tokenizer, engine.info.max_context
    bad = list(bad or ())
    sampling = _check_sampling(p.sampling, bad)
    max_new, time_limit_ms = _check_stopping(p, cfg, max_context, bad)
    if p.top_n < 0:
        bad.append(FieldViolation("response.top_n", "must be a non-negative integer"))
    elif p.top_n > cfg.max_top_n:
        bad.append(FieldViolation("response.top_n", f"must be at most {cfg.max_top_n}"))
    if len(p.prompt.encode("utf-8")) > cfg.max_prompt_bytes:
        bad.append(FieldViolation("prompt", f"longer than {cfg.max_prompt_bytes} bytes"))
    if sum(len(m.role.encode("utf-8")) + len(m.content.encode("utf-8")) for m in p.messages) > cfg.max_prompt_bytes:
        bad.append(FieldViolation("messages", f"longer than {cfg.max_prompt_bytes} bytes in all"))
    compiled = _check_constraint(p, engine, bad)
    ids = _prompt_ids(p, cfg, tok, engine.info.vocab_size, bad)
    if ids is not None and not bad:
        field = "messages" if p.messages else "prompt_ids" if p.prompt_ids is not None else "prompt"
        if not ids:
            bad.append(FieldViolation(field, "has no tokens"))
        elif len(ids) >= max_context:
            bad.append(FieldViolation(field, f"is {len(ids)} tokens; the context holds {max_context}, "
                                             "including at least one generated token"))
        elif cfg.max_prompt_tokens and len(ids) > cfg.max_prompt_tokens:
            bad.append(FieldViolation(field, f"is {len(ids)} tokens; at most {cfg.max_prompt_tokens} are allowed"))
    if bad or ids is None:
        raise InvalidRequestError(bad)
    engine_request = GenerationRequest(
        prompt_ids=ids, max_new_tokens=max_new, sampling=sampling, min_new_tokens=p.min_new_tokens,
        stop_sequences=p.stop_sequences, include_stop_sequence=p.include_stop_sequence, logprobs=p.logprobs,
        top_n=p.top_n, echo_prompt_tokens=p.echo_prompt_tokens, constraint=compiled, cache_salt=p.cache_salt)
    return engine_request, time_limit_ms


def _check_constraint(p: GenerateParams, engine: EngineClient,
                      bad: list[FieldViolation]) -> CompiledConstraint | None:
    """The compiled constraint, or None; a violation with the compiler's reason."""
    spec = p.constraint
    if spec is None:
        return None
    if p.min_new_tokens > 0:
        bad.append(FieldViolation("stopping.min_new_tokens", "cannot be combined with a constraint: the output ends "
                                                             "where the constraint lets it"))
        return None
    info = engine.info
    try:
        return compile_constraint(spec.kind, spec.value,
                                  ll_tokenizer(engine.tokenizer, info.vocab_size, info.eos_token_ids))
    except ConstraintError as exc:
        bad.append(FieldViolation(spec.field, f"cannot be compiled: {exc}"))
        return None


def check_tokenize(text: str, cfg: Config) -> None:
    if not text:
        raise InvalidRequestError([FieldViolation("text", "must not be empty")])
    if len(text.encode("utf-8")) > cfg.max_prompt_bytes:
        raise InvalidRequestError([FieldViolation("text", f"longer than {cfg.max_prompt_bytes} bytes")])
