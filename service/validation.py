"""Every field of every request is checked here, and every violation is reported with its field path."""

from __future__ import annotations

import math
from collections.abc import Callable

from google.protobuf.message import DecodeError, Message

from service.config import Config
from service.engine.api import EngineClient, Tokenizing
from service.engine.types import GenerationRequest, SamplingOptions
from service.errors import FieldViolation, InvalidRequestError
from tokenstream.v1 import generation_pb2 as pb

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0


class UndecodableRequest:
    """Stands in for request bytes that are not a valid message (bad wire format, or invalid UTF-8 in a string),
    so the servicer can answer INVALID_ARGUMENT instead of gRPC's generic deserialization failure."""

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant(parse: Callable[[bytes], Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    def deserialize(data: bytes) -> Message | UndecodableRequest:
        try:
            return parse(data)
        except DecodeError as exc:
            return UndecodableRequest(str(exc))

    return deserialize


def check_decodable(req: object) -> None:
    if isinstance(req, UndecodableRequest):
        raise InvalidRequestError([FieldViolation("request", f"not a valid message: {req.error}")])


def _check_sampling(s: pb.SamplingParams, bad: list[FieldViolation]) -> SamplingOptions:
    temperature = s.temperature if s.HasField("temperature") else 0.0
    if not math.isfinite(temperature) or not 0.0 <= temperature <= MAX_TEMPERATURE:
        bad.append(FieldViolation("sampling.temperature", f"must be 0 (greedy) or in (0, {MAX_TEMPERATURE:g}]"))
    top_p = s.top_p if s.top_p != 0.0 else 1.0
    if not math.isfinite(top_p) or not 0.0 < top_p <= 1.0:
        bad.append(FieldViolation("sampling.top_p", "must be in (0, 1]"))
    penalty = s.repetition_penalty if s.repetition_penalty != 0.0 else 1.0
    if not math.isfinite(penalty) or not 0.0 < penalty <= MAX_REPETITION_PENALTY:
        bad.append(FieldViolation("sampling.repetition_penalty", f"must be in (0, {MAX_REPETITION_PENALTY:g}]"))
    return SamplingOptions(
        temperature=temperature if math.isfinite(temperature) else 0.0,
        top_k=s.top_k,
        top_p=top_p,
        seed=s.seed if s.HasField("seed") else None,
        repetition_penalty=penalty,
    )


def max_new_tokens_limit(cfg: Config, max_context: int) -> int:
    """The most tokens a request may ask for: the configured limit, capped at the context less one prompt token."""
    return max(1, min(cfg.max_new_tokens_limit, max_context - 1))


def _check_stopping(st: pb.StoppingCriteria, cfg: Config, max_context: int,
                    bad: list[FieldViolation]) -> tuple[int, int, int]:
    limit = max_new_tokens_limit(cfg, max_context)
    max_new = st.max_new_tokens if st.HasField("max_new_tokens") else min(cfg.max_new_tokens, limit)
    if st.HasField("max_new_tokens") and not 0 < max_new <= limit:
        bad.append(FieldViolation("stopping.max_new_tokens", f"must be in [1, {limit}]"))
    if st.min_new_tokens > max_new:
        bad.append(FieldViolation("stopping.min_new_tokens", "must not exceed max_new_tokens"))
    time_limit = st.time_limit_ms if st.HasField("time_limit_ms") else cfg.max_request_ms
    if st.HasField("time_limit_ms") and time_limit == 0:
        bad.append(FieldViolation("stopping.time_limit_ms", "must be positive; leave it unset for the server maximum"))
    if len(st.stop_sequences) > cfg.max_stop_sequences:
        bad.append(FieldViolation("stopping.stop_sequences", f"at most {cfg.max_stop_sequences} are allowed"))
    for i, stop in enumerate(st.stop_sequences[: cfg.max_stop_sequences]):
        if not stop:
            bad.append(FieldViolation(f"stopping.stop_sequences[{i}]", "must not be empty"))
        elif len(stop) > cfg.max_stop_sequence_chars:
            bad.append(FieldViolation(f"stopping.stop_sequences[{i}]",
                                      f"longer than {cfg.max_stop_sequence_chars} characters"))
    return max_new, min(time_limit, cfg.max_request_ms), st.min_new_tokens


def _prompt_ids(req: pb.GenerateRequest, cfg: Config, tok: Tokenizing, bad: list[FieldViolation]) -> list[int] | None:
    if req.prompt and req.messages:
        bad.append(FieldViolation("messages", "set either prompt or messages, not both"))
        return None
    if req.messages:
        if len(req.messages) > cfg.max_messages:
            bad.append(FieldViolation("messages", f"at most {cfg.max_messages} messages are allowed"))
            return None
        for i, m in enumerate(req.messages):
            if not m.role:
                bad.append(FieldViolation(f"messages[{i}].role", "must not be empty"))
        if any(v.field.startswith("messages") for v in bad):
            return None
        if not tok.chat_template:
            bad.append(FieldViolation("messages", "the model has no chat template; send a raw prompt instead"))
            return None
        if bad:
            return None  # don't render or encode a request that is rejected anyway
        # Content never becomes control tokens: a message cannot close its turn and forge another.
        return tok.encode_chat([{"role": m.role, "content": m.content} for m in req.messages])
    if not req.prompt:
        bad.append(FieldViolation("prompt", "must not be empty (or send messages)"))
        return None
    if bad:
        return None
    return tok.encode(req.prompt)


def validate_generate(req: pb.GenerateRequest, cfg: Config, engine: EngineClient) -> tuple[GenerationRequest, int]:
    """The engine request and its time limit in ms; InvalidRequestError naming every bad field otherwise.

    Every front validates through here (the HTTP front translates its JSON into a GenerateRequest first). The
    engine request has no deadline yet: admission sets it from the time limit and the caller's deadline.
    """
    check_decodable(req)
    tok, max_context = engine.tokenizer, engine.info.max_context
    bad: list[FieldViolation] = []
    sampling = _check_sampling(req.sampling, bad)
    max_new, time_limit_ms, min_new = _check_stopping(req.stopping, cfg, max_context, bad)
    if req.response.top_n > cfg.max_top_n:
        bad.append(FieldViolation("response.top_n", f"must be at most {cfg.max_top_n}"))
    if len(req.prompt.encode("utf-8")) > cfg.max_prompt_bytes:
        bad.append(FieldViolation("prompt", f"longer than {cfg.max_prompt_bytes} bytes"))
    if sum(len(m.content.encode("utf-8")) for m in req.messages) > cfg.max_prompt_bytes:
        bad.append(FieldViolation("messages", f"longer than {cfg.max_prompt_bytes} bytes in all"))
    before = len(bad)
    prompt_ids = _prompt_ids(req, cfg, tok, bad)
    ids: list[int] = []
    if prompt_ids is not None and len(bad) == before and not bad:
        ids = prompt_ids
        field = "messages" if req.messages else "prompt"
        if not ids:
            bad.append(FieldViolation(field, "has no tokens"))
        elif len(ids) >= max_context:
            bad.append(FieldViolation(field, f"is {len(ids)} tokens; the context holds {max_context}, "
                                             "including at least one generated token"))
        elif cfg.max_prompt_tokens and len(ids) > cfg.max_prompt_tokens:
            bad.append(FieldViolation(field, f"is {len(ids)} tokens; at most {cfg.max_prompt_tokens} are allowed"))
    if bad:
        raise InvalidRequestError(bad)
    engine_request = GenerationRequest(
        prompt_ids=ids,
        max_new_tokens=max_new,
        sampling=sampling,
        min_new_tokens=min_new,
        stop_sequences=tuple(req.stopping.stop_sequences),
        include_stop_sequence=req.stopping.include_stop_sequence,
        logprobs=req.response.logprobs,
        top_n=req.response.top_n,
        echo_prompt_tokens=req.response.echo_prompt_tokens,
    )
    return engine_request, time_limit_ms


def validate_tokenize(req: pb.TokenizeRequest, cfg: Config) -> None:
    check_decodable(req)
    if not req.text:
        raise InvalidRequestError([FieldViolation("text", "must not be empty")])
    if len(req.text.encode("utf-8")) > cfg.max_prompt_bytes:
        raise InvalidRequestError([FieldViolation("text", f"longer than {cfg.max_prompt_bytes} bytes")])
