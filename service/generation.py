"""One Generate request's life, whichever front it came through: ADMITTED, STREAMING, ENDED."""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from service.admission import admit, targets
from service.calls import CallInfo
from service.engine.api import EngineClient, EngineStoppedError, EngineStream, QueueFullError
from service.engine.types import Chunk, ErrorKind, Finish, GenerationRequest, Timings
from service.errors import EngineOutOfMemoryError, NotReadyError, ShuttingDownError, code_name
from service.logs import request_fields
from service.request_telemetry import RequestTelemetry
from service.state import ServerState
from service.validation import GenerateParams, to_generation_request

# Validation with template rendering and tokenizing, for both fronts: a few threads, so that a burst of huge prompts
# queues here instead of taking every core (and requests with small prompts pass through in microseconds).
T = TypeVar("T")
log = logging.getLogger("tokenstream.generation")
_TOKENIZING = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tokenstream-tokenize")


async def tokenizing(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on a tokenizing worker, with this task's context (its log fields): never on the event loop."""
    ctx = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZING, functools.partial(ctx.run, fn, *args))


class GenerateRunner:
    """Runs Generate requests for both fronts: each front parses its wire format into GenerateParams and a
    CallInfo, and turns the chunks (or the exception) back into its own messages."""

    def __init__(self, state: ServerState, telemetry: RequestTelemetry) -> None:
        self.state = state
        self.telemetry = telemetry

    def run(self, params: GenerateParams, call: CallInfo) -> AsyncGenerator[Chunk, None]:
        """The request's chunks. Errors raise (the front maps them); leaving early cancels the engine work."""
        return GenerateLifecycle(self, params, call).chunks()

    def reject(self, call: CallInfo, exc: BaseException) -> None:
        """A request a front refused before run() (its own checks: JSON shape, a parameter only it has)."""
        self.telemetry.reject(call, exc)


class Phase(enum.Enum):
    ADMITTING = "admitting"  # checked, admitted and handed to the engine, or refused
    STREAMING = "streaming"  # the engine stream is open and counted in active_streams
    ENDED = "ended"  # span, rate, metrics and log line written


class GenerateLifecycle:
    """One request: validation, admission, the engine stream, cancellation, and its record, written once."""

    def __init__(self, runner: GenerateRunner, params: GenerateParams, call: CallInfo) -> None:
        self.state = runner.state
        self.params = params
        self.call = call
        self.phase = Phase.ADMITTING
        self.record = runner.telemetry.begin(call)
        request_fields.set(self.record.fields)  # for log lines in this task; the final one names them itself
        self.request: GenerationRequest | None = None
        self.stream: EngineStream | None = None
        self.final: Chunk | None = None
        self.output: list[str] = []  # only with --log-text
        self.refused = False  # refused at drain before the engine started it

    def _request(self, engine: EngineClient) -> tuple[GenerationRequest, int]:
        """Validation, template rendering and tokenizing: on the tokenizing worker, never on the event loop."""
        if self.state.tokenizing_hook is not None:
            self.state.tokenizing_hook(self.params)
        return to_generation_request(self.params, self.state.config, engine, [])

    async def _admit(self) -> EngineStream:
        config, call = self.state.config, self.call
        engine = self.state.ready_engine()
        goals = targets(call.slo_headers)  # a malformed target is refused before any work
        # What "unset" means is the front's (CallInfo.front); applying it here is the one path for both.
        defaults = call.front.sampling_defaults(engine.info)
        self.params = dataclasses.replace(self.params, sampling=self.params.sampling.over(defaults))
        # A prompt of up to max_prompt_bytes takes a second or more to render and tokenize: off the loop, which
        # answers health probes and feeds every other stream.
        req, limit_ms = await tokenizing(self._request, engine)
        engine = self.state.ready_engine()  # draining may have begun, or the engine died, meanwhile
        req = dataclasses.replace(req, request_id=call.request_id, trace_id=self.record.trace_id,
                                  caller=call.caller.id, sub_caller=call.caller.sub, priority=call.priority)
        self.request = req = admit(engine, req, limit_ms, call.remaining_s, config, goals)
        if self.state.rates is not None:
            self.state.rates.check(call.caller.id)
        self.record.admitted(self.params, req, engine.info.name)
        try:
            stream = engine.generate(req)
        except EngineStoppedError as exc:
            raise NotReadyError("the engine has stopped; retry on another instance") from exc
        self.state.stream_started()
        self.stream, self.phase = stream, Phase.STREAMING
        return stream

    def refuse_if_unstarted(self) -> None:
        """At drain (ServerState.refuse_unstarted): a request the engine has not started is ended now, and the
        caller gets UNAVAILABLE, which clients retry on another instance: nothing was sent, nothing is lost."""
        stream = self.stream
        if stream is not None and not self.refused and stream.marks.prefill_start_ns == 0:
            self.refused = True
            stream.cancel()

    async def chunks(self) -> AsyncGenerator[Chunk, None]:
        code = "OK"
        try:
            stream = await self._admit()
            self.state.unsent.add(self)
            try:
                sent_tokens = 0
                async for chunk in stream:
                    if self.refused:  # refused at drain before any message: whatever came is not sent
                        raise ShuttingDownError("the server is shutting down and had not started this request; "
                                                "retry on another instance")
                    if chunk.finish is not None:
                        self.final = chunk
                    if chunk.error_kind is ErrorKind.OUT_OF_MEMORY and sent_tokens == 0:
                        raise EngineOutOfMemoryError(chunk.error)
                    if chunk.error_kind is ErrorKind.OVERLOADED and sent_tokens == 0:
                        raise QueueFullError(chunk.error)
                    sent_tokens += len(chunk.tokens)
                    if self.state.config.log_text:
                        self.output.append(chunk.text)
                    if chunk.finish is not None:
                        # Ended before the final message goes out, so that a caller who has it also finds the
                        # request counted.
                        self._end("OK")
                    self.state.unsent.discard(self)
                    yield chunk
            finally:
                self.state.unsent.discard(self)
                stream.cancel()  # a no-op once finished
                self.state.stream_ended()
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = code_name(exc)
            if code == "INTERNAL":  # unmapped: the caller is told its type only (errors.py), the operator all of it
                log.error("request %s failed", self.record.call.request_id, exc_info=exc)
            raise
        finally:
            self._end(code)

    def _end(self, code: str) -> None:
        """Span, rate, metrics and log line, once."""
        if self.phase is Phase.ENDED:
            return
        if self.final is None and self.stream is not None and self.request is not None:
            self.final = _cancelled_summary(self.stream, self.request)
        if self.final is not None and self.state.rates is not None:
            self.state.rates.charge(self.call.caller.id, self.final.completion_tokens)
        log_text = self.state.config.log_text
        self.record.end(code, self.final, self.params.prompt if log_text else None,
                        "".join(self.output) if log_text else None)
        self.phase = Phase.ENDED


def _cancelled_summary(stream: EngineStream, req: GenerationRequest) -> Chunk:
    """What a stream that the caller left had used, from the marks the engine keeps while it runs."""
    m = stream.marks
    return Chunk("", finish=Finish.CANCELLED, prompt_tokens=len(req.prompt_ids), completion_tokens=m.tokens_emitted,
                 timings=Timings(m.arrival_ns, m.prefill_start_ns, m.first_token_ns, time.time_ns()))
