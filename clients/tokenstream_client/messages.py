"""Plain Python views of the tokenstream.v1 messages: what the SDK yields and returns."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tokenstream.v1 import generation_pb2 as pb


class FinishReason(enum.StrEnum):
    """Why a stream ended; the proto enum without its FINISH_REASON_ prefix."""

    MAX_TOKENS = "MAX_TOKENS"
    EOS_TOKEN = "EOS_TOKEN"
    STOP_SEQUENCE = "STOP_SEQUENCE"
    TIME_LIMIT = "TIME_LIMIT"
    CONTEXT_LENGTH = "CONTEXT_LENGTH"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"
    UNKNOWN = "UNKNOWN"  # a value this client does not know (a newer server)

    @classmethod
    def from_proto(cls, value: int) -> FinishReason | None:
        """None for FINISH_REASON_UNSPECIFIED, which every message but the final one carries."""
        if value == pb.FINISH_REASON_UNSPECIFIED:
            return None
        try:
            return cls(pb.FinishReason.Name(value).removeprefix("FINISH_REASON_"))
        except ValueError:
            return cls.UNKNOWN


@dataclass(frozen=True, slots=True)
class TopToken:
    id: int
    text: str
    logprob: float


@dataclass(frozen=True, slots=True)
class Token:
    id: int
    text: str
    logprob: float | None = None
    top_tokens: tuple[TopToken, ...] = ()

    @classmethod
    def from_proto(cls, t: pb.Token) -> Token:
        return cls(
            id=t.id,
            text=t.text,
            logprob=t.logprob if t.HasField("logprob") else None,
            top_tokens=tuple(TopToken(a.id, a.text, a.logprob) for a in t.top_tokens),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.logprob is not None:
            out["logprob"] = self.logprob
        if self.top_tokens:
            out["top_tokens"] = [{"id": a.id, "text": a.text, "logprob": a.logprob} for a in self.top_tokens]
        return out


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True, slots=True)
class Timings:
    """Server-side timings of one request, in milliseconds."""

    queue_ms: float
    time_to_first_token_ms: float
    decode_ms: float
    total_ms: float

    def to_dict(self) -> dict[str, float]:
        return {
            "queue_ms": self.queue_ms,
            "time_to_first_token_ms": self.time_to_first_token_ms,
            "decode_ms": self.decode_ms,
            "total_ms": self.total_ms,
        }


@dataclass(frozen=True)
class Delta:
    """One streamed message: a text delta and the tokens it covers; the final one also says why it ended."""

    text: str
    tokens: tuple[Token, ...] = ()
    finish_reason: FinishReason | None = None  # set on the final message only
    usage: Usage | None = None  # final message only
    timings: Timings | None = None  # final message only
    seed: int | None = None  # final message of a sampled request
    stop_sequence: str | None = None  # final message, when a stop sequence matched
    error_message: str | None = None  # final message, when finish_reason is ERROR
    prompt_token_ids: tuple[int, ...] = ()  # first message, when echo_prompt_tokens was asked for
    raw: pb.GenerateResponse | None = field(default=None, repr=False, compare=False)

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]

    @property
    def is_final(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Delta:
        finish = FinishReason.from_proto(msg.finish_reason)
        final = finish is not None
        return cls(
            text=msg.text,
            tokens=tuple(Token.from_proto(t) for t in msg.tokens),
            finish_reason=finish,
            usage=Usage(msg.usage.prompt_tokens, msg.usage.completion_tokens) if final else None,
            timings=Timings(
                msg.timings.queue_ms, msg.timings.time_to_first_token_ms, msg.timings.decode_ms, msg.timings.total_ms
            ) if final and msg.HasField("timings") else None,
            seed=msg.seed if msg.HasField("seed") else None,
            stop_sequence=msg.stop_sequence or None,
            error_message=msg.error_message or None,
            prompt_token_ids=tuple(msg.prompt_token_ids),
            raw=msg,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: text and token ids always, the rest when set."""
        out: dict[str, Any] = {"text": self.text, "token_ids": self.token_ids}
        if any(t.logprob is not None or t.top_tokens for t in self.tokens):
            out["tokens"] = [t.to_dict() for t in self.tokens]
        if self.prompt_token_ids:
            out["prompt_token_ids"] = list(self.prompt_token_ids)
        out["finish_reason"] = self.finish_reason.value if self.finish_reason else None
        if self.usage is not None:
            out["usage"] = self.usage.to_dict()
        if self.timings is not None:
            out["timings"] = self.timings.to_dict()
        if self.seed is not None:
            out["seed"] = self.seed
        if self.stop_sequence is not None:
            out["stop_sequence"] = self.stop_sequence
        if self.error_message is not None:
            out["error_message"] = self.error_message
        return out


@dataclass(frozen=True)
class GenerationResult:
    """A whole stream, collected."""

    text: str
    token_ids: tuple[int, ...]
    tokens: tuple[Token, ...]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings | None
    seed: int | None
    stop_sequence: str | None
    error_message: str | None
    prompt_token_ids: tuple[int, ...]
    request_id: str
    attempts: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason.value,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict() if self.timings else None,
            "seed": self.seed,
            "stop_sequence": self.stop_sequence,
            "error_message": self.error_message,
            "request_id": self.request_id,
        }


class ResultBuilder:
    """Accumulates deltas into a GenerationResult."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._tokens: list[Token] = []
        self._prompt_ids: tuple[int, ...] = ()
        self.final: Delta | None = None

    def add(self, delta: Delta) -> None:
        self._text.append(delta.text)
        self._tokens.extend(delta.tokens)
        if delta.prompt_token_ids:
            self._prompt_ids = delta.prompt_token_ids
        if delta.is_final:
            self.final = delta

    def extend(self, deltas: Iterable[Delta]) -> None:
        for delta in deltas:
            self.add(delta)

    def result(self, request_id: str, attempts: int = 1) -> GenerationResult:
        final = self.final
        if final is None or final.finish_reason is None or final.usage is None:
            raise ValueError("the stream has no final message yet")
        return GenerationResult(
            text="".join(self._text),
            token_ids=tuple(t.id for t in self._tokens),
            tokens=tuple(self._tokens),
            finish_reason=final.finish_reason,
            usage=final.usage,
            timings=final.timings,
            seed=final.seed,
            stop_sequence=final.stop_sequence,
            error_message=final.error_message,
            prompt_token_ids=self._prompt_ids,
            request_id=request_id,
            attempts=attempts,
        )


@dataclass(frozen=True)
class TokenizeResult:
    token_count: int
    ids: tuple[int, ...]
    tokens: tuple[str, ...] = ()  # when return_tokens was asked for
    offsets: tuple[tuple[int, int], ...] = ()  # [start, end) in characters, when return_offsets was asked for

    @classmethod
    def from_proto(cls, msg: pb.TokenizeResponse) -> TokenizeResult:
        return cls(
            token_count=msg.token_count,
            ids=tuple(msg.ids),
            tokens=tuple(msg.tokens),
            offsets=tuple((o.start, o.end) for o in msg.offsets),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token_count": self.token_count, "ids": list(self.ids)}
        if self.tokens:
            out["tokens"] = list(self.tokens)
        if self.offsets:
            out["offsets"] = [list(o) for o in self.offsets]
        return out


@dataclass(frozen=True)
class ModelInfo:
    model_name: str
    architecture: str
    max_context_length: int
    max_new_tokens: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    dtype: str
    device: str
    max_batch_size: int
    has_chat_template: bool
    max_top_n: int

    @classmethod
    def from_proto(cls, msg: pb.GetModelInfoResponse) -> ModelInfo:
        return cls(
            model_name=msg.model_name,
            architecture=msg.architecture,
            max_context_length=msg.max_context_length,
            max_new_tokens=msg.max_new_tokens,
            vocab_size=msg.vocab_size,
            eos_token_ids=tuple(msg.eos_token_ids),
            dtype=msg.dtype,
            device=msg.device,
            max_batch_size=msg.max_batch_size,
            has_chat_template=msg.has_chat_template,
            max_top_n=msg.max_top_n,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {f: getattr(self, f) for f in self.__dataclass_fields__}
        out["eos_token_ids"] = list(self.eos_token_ids)
        return out
