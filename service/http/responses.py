"""Engine chunks in, OpenAI objects out: streamed chunks, the whole response, usage, the model card."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from service.engine.types import Chunk, Finish, TokenOut
from service.errors import stream_error
from service.http.requests import Parsed, ToolCall

# OpenAI's finish_reason; the engine's own reason goes into the choice's "tokenstream" extension object.
FINISH_REASON = {
    Finish.EOS_TOKEN: "stop", Finish.STOP_SEQUENCE: "stop", Finish.MAX_TOKENS: "length",
    Finish.CONTEXT_LENGTH: "length", Finish.TIME_LIMIT: "length", Finish.CANCELLED: "length",
}


TokenBytes = Callable[[int], bytes | None]  # a token id's own bytes, where the vocabulary knows them


def _token_bytes(text: str, token_id: int, lookup: TokenBytes | None) -> bytes:
    """A token's bytes: its text's, unless the token is part of a character (its text is U+FFFD), then the
    vocabulary's own bytes for it."""
    if "\ufffd" in text and lookup is not None and (raw := lookup(token_id)) is not None:
        return raw
    return text.encode()


def _extension(final: Chunk) -> dict[str, Any]:
    """The engine's own account of the ending, beside OpenAI's stop/length."""
    assert final.finish is not None
    ext: dict[str, Any] = {"finish_reason": final.finish.value}
    if final.stop_sequence:
        ext["stop_sequence"] = final.stop_sequence
    if final.seed is not None:
        ext["seed"] = final.seed
    if final.timings is not None:
        t = final.timings
        ext["timings"] = {"queue_ms": round(t.queue_ms, 3), "time_to_first_token_ms": round(t.ttft_ms, 3),
                          "decode_ms": round(t.decode_ms, 3), "total_ms": round(t.total_ms, 3)}
    return ext


_WRAPPED_CALL = re.compile(r'\{"name": "([^"\\]*)", "arguments": ')


class ToolCallStream:
    """A constrained output read as one function call (requests.ToolCall): the function's name, from the wrapper's
    start when several functions were offered, and the argument text, released as it comes (byte-exact; with a
    wrapper, one character is held back until it is known not to be the wrapper's closing brace)."""

    def __init__(self, call: ToolCall, call_id: str) -> None:
        self.call = call
        self.id = call_id
        self.name: str | None = None if call.wrapped else call.names[0]
        self._start: int | None = None if call.wrapped else 0  # where the arguments start in the text
        self.text = ""
        self._sent = 0  # argument characters released
        self._announced = False

    def arguments(self, final: bool = True) -> str:
        """The argument text that may be released: all of it once the output is final."""
        if self._start is None and (m := _WRAPPED_CALL.match(self.text)):
            self.name, self._start = m.group(1), m.end()
        if self._start is None:
            return ""
        args = self.text[self._start:]
        if not self.call.wrapped:
            return args
        if final:
            try:
                json.loads(self.text)
            except ValueError:
                return args  # cut short (length): no closing brace of the wrapper was written
            return args[:-1]
        return args[:-1]

    def delta(self, text: str, final: bool) -> list[dict[str, Any]] | None:
        """OpenAI's delta.tool_calls for this text: id, type and name in the first fragment, argument text after."""
        self.text += text
        args = self.arguments(final)
        fresh, self._sent = args[self._sent:], max(self._sent, len(args))
        if self.name is None or (self._announced and not fresh):
            return None
        fragment: dict[str, Any] = {"index": 0, "function": {"arguments": fresh}}
        if not self._announced:
            self._announced = True
            fragment = {"index": 0, "id": self.id, "type": "function",
                        "function": {"name": self.name, "arguments": fresh}}
        return [fragment]

    def message(self) -> dict[str, Any]:
        """The whole call, for a non-streamed response."""
        args = self.arguments(final=True)
        return {"id": self.id, "type": "function", "function": {"name": self.name or "", "arguments": args}}


def engine_error(chunk: Chunk) -> dict[str, Any]:
    """The OpenAI error object for a stream the engine ended with an error after it had started."""
    return {"error": {"message": stream_error(chunk.error, chunk.error_kind), "type": "server_error", "param": None,
                      "code": "internal"}}


class Responder:
    """Builds one request's OpenAI objects: a chunk per engine chunk when streaming, or the whole response."""

    def __init__(self, parsed: Parsed, model: str, request_id: str, eos_ids: Collection[int] = (),
                 token_bytes: TokenBytes | None = None) -> None:
        self.p = parsed
        self.eos_ids = frozenset(eos_ids)  # an end-of-sequence token ends the text; it is no logprobs entry
        self.token_bytes = token_bytes
        self.model = model
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self._started = False
        self._text = b""  # the bytes of the tokens so far, for the completions logprobs' text_offset
        self._tool = ToolCallStream(parsed.tool_call, "call_" + request_id) if parsed.tool_call and parsed.chat \
            else None

    def _usage(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}

    def _count(self, chunk: Chunk) -> None:
        if chunk.prompt_token_ids:
            self.prompt_tokens = len(chunk.prompt_token_ids)
        self.completion_tokens += len(chunk.tokens)
        if chunk.finish is not None:
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            self.cached_tokens = chunk.cached_prompt_tokens

    def _logprobs(self, tokens: Sequence[TokenOut]) -> dict[str, Any] | None:
        if not self.p.logprobs:
            return None
        top_n = self.p.params.top_n
        tokens = [t for t in tokens if t.id not in self.eos_ids]

        def raw(text: str, token_id: int) -> list[int]:
            return list(_token_bytes(text, token_id, self.token_bytes))

        if self.p.chat:
            return {"content": [{
                "token": t.text, "logprob": t.logprob, "bytes": raw(t.text, t.id),
                "top_logprobs": [{"token": a.text, "logprob": a.logprob, "bytes": raw(a.text, a.id)} for a in t.top],
            } for t in tokens], "refusal": None}
        offsets = []
        for t in tokens:
            # Where the token starts in the text, in characters: a token that continues a character starts at it.
            offsets.append(len(self._text.decode("utf-8", "ignore")))
            self._text += _token_bytes(t.text, t.id, self.token_bytes)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [{a.text: a.logprob for a in t.top} for t in tokens] if top_n else None,
                "text_offset": offsets}

    def chunk(self, chunk: Chunk) -> dict[str, Any] | None:
        """The streamed object for one engine chunk, or None when it says nothing (no text, no tokens, not last)."""
        self._count(chunk)
        if not chunk.text and not chunk.tokens and chunk.finish is None and self._started:
            return None
        finish = self._finish_reason(chunk.finish)
        choice: dict[str, Any]
        if self.p.chat:
            delta: dict[str, Any] = {} if self._started else {"role": "assistant"}
            if self._tool is not None:
                if not self._started:
                    delta["content"] = None
                if calls := self._tool.delta(chunk.text, chunk.finish is not None):
                    delta["tool_calls"] = calls
            elif chunk.text or not self._started:
                delta["content"] = chunk.text
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(chunk.tokens), "finish_reason": finish}
        else:
            choice = {"index": 0, "text": chunk.text, "logprobs": self._logprobs(chunk.tokens),
                      "finish_reason": finish}
        if chunk.finish is not None:
            choice["tokenstream"] = _extension(chunk)
        self._started = True
        obj = self._envelope("chat.completion.chunk" if self.p.chat else "text_completion", [choice])
        if self.p.include_usage or self.p.continuous_usage:
            obj["usage"] = self._usage() if self.p.continuous_usage else None
        return obj

    def usage_chunk(self) -> dict[str, Any]:
        """The last streamed object when stream_options.include_usage is set: no choices, the request's usage."""
        obj = self._envelope("chat.completion.chunk" if self.p.chat else "text_completion", [])
        obj["usage"] = self._usage()
        return obj

    def whole(self, chunks: Sequence[Chunk]) -> dict[str, Any]:
        """The non-streamed response from all of a request's chunks (the last one carries the finish)."""
        for c in chunks:
            self._count(c)
        final = chunks[-1]
        assert final.finish is not None
        text = "".join(c.text for c in chunks)
        logprobs = self._logprobs([t for c in chunks for t in c.tokens])
        finish = self._finish_reason(final.finish)
        choice: dict[str, Any]
        if self.p.chat and self._tool is not None:
            self._tool.text = text
            choice = {"index": 0, "message": {"role": "assistant", "content": None, "refusal": None,
                                              "tool_calls": [self._tool.message()]},
                      "logprobs": logprobs, "finish_reason": finish}
        elif self.p.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                      "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        choice["tokenstream"] = _extension(final)
        obj = self._envelope("chat.completion" if self.p.chat else "text_completion", [choice])
        obj["usage"] = self._usage()
        return obj

    def _finish_reason(self, finish: Finish | None) -> str | None:
        """OpenAI's finish_reason: "tool_calls" for a completed call; "length" whenever the output may be cut short
        (max tokens, the context, a time limit), so a caller knows constrained JSON may be incomplete."""
        if finish is None:
            return None
        if self._tool is not None and finish is Finish.EOS_TOKEN:
            return "tool_calls"
        return FINISH_REASON.get(finish)

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}


def model_card(name: str, max_context: int, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "tokenstream",
            "max_model_len": max_context}

