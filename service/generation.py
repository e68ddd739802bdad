"""One Generate request's life, whichever front it came through (gRPC, HTTP).

A front only translates its wire format into a `GenerateRequest` message and chunks back into its own messages.
Everything else happens here, once: readiness, validation, admission, the engine stream, cancellation, and the
request's span attributes, child spans, metrics and JSON log line (cancelled streams included).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from google.rpc import code_pb2
from opentelemetry import propagate, trace

from service.admission import TokenRates, admit
from service.callers import Caller
from service.config import Config
from service.engine.api import EngineClient, EngineStream, QueueFullError
from service.engine.types import Chunk, ErrorKind, Finish, GenerationRequest, Timings
from service.errors import EngineOutOfMemoryError, NotReadyError, ShuttingDownError, code_name, http_status
from service.logs import request_fields
from service.metrics import Metrics
from service.validation import validate_generate
from tokenstream.v1 import generation_pb2 as pb

log = logging.getLogger("tokenstream.requests")


@dataclass
class ServerState:
    """What the fronts know about the engine's life: loading, serving, draining."""

    config: Config
    auth_on: bool = False  # bearer tokens are required (then they identify callers)
    engine: EngineClient | None = None
    draining: bool = False
    active_streams: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    rates: TokenRates | None = None  # per-caller token rates, when configured

    def __post_init__(self) -> None:
        if self.config.caller_tokens_per_s > 0:
            self.rates = TokenRates(self.config.caller_tokens_per_s, self.config.caller_token_burst)

    def ready_engine(self) -> EngineClient:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.engine is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.engine

    def stream_ended(self) -> None:
        self.active_streams -= 1
        if self.draining and self.active_streams == 0:
            self.drained.set()


@dataclass(frozen=True)
class CallInfo:
    """What a front knows about one call besides its request message."""

    request_id: str
    remaining_s: float | None  # until the caller's own deadline, if it set one
    front: str  # "grpc" or "http"
    caller: Caller  # who is calling (service/callers.py): fair sharing and per-caller limits
    span_name: str  # e.g. "/tokenstream.v1.GenerationService/Generate" or "POST /v1/chat/completions"
    carrier: dict[str, str] = field(default_factory=dict)  # headers or metadata, for `traceparent`
    span_attributes: dict[str, str | int] = field(default_factory=dict)  # the front's own (rpc.*, http.*)


class Generations:
    def __init__(self, state: ServerState, tracer: trace.Tracer, metrics: Metrics) -> None:
        self.state = state
        self.tracer = tracer
        self.metrics = metrics

    async def run(self, request: pb.GenerateRequest, call: CallInfo) -> AsyncGenerator[Chunk, None]:
        """The request's chunks. Errors raise (the front maps them); leaving early cancels the engine work.

        The request's server span is made here rather than by a transport interceptor, so that a stream the caller
        leaves still gets its usage and child spans before the span ends, whichever front it came through.
        """
        config = self.state.config
        span, fields = self._begin(call)
        trace_id = str(fields["trace_id"] or "")
        request_fields.set(fields)  # for log lines in this task; the final one names them itself
        engine_req: GenerationRequest | None = None
        stream: EngineStream | None = None
        final: Chunk | None = None
        code = "OK"
        output: list[str] = []
        concluded = False

        def conclude() -> None:
            """Span, rate, metrics and log line, once. For a finished stream, before its final message goes out,
            so that a caller who has the final message also finds the request counted."""
            nonlocal final, concluded
            if concluded:
                return
            concluded = True
            if final is None and stream is not None and engine_req is not None:
                final = _cancelled_summary(stream, engine_req)
            if final is not None:
                self._record(span, final)
                if self.state.rates is not None:
                    self.state.rates.charge(call.caller.id, final.completion_tokens)
            self._end(span, code, call)
            self.metrics.observe(final, code, call.front, call.caller.cls)
            self._log(call, fields, code, final, request.prompt if config.log_text else None,
                      "".join(output) if config.log_text else None)

        try:
            engine = self.state.ready_engine()
            engine_req, limit_ms = validate_generate(request, config, engine)
            engine_req = dataclasses.replace(engine_req, request_id=call.request_id, trace_id=trace_id,
                                             caller=call.caller.id)
            engine_req = admit(engine, engine_req, limit_ms, call.remaining_s, config)
            if self.state.rates is not None:
                self.state.rates.check(call.caller.id)
            _request_attributes(span, request, engine_req, engine.info.name, call)
            stream = engine.generate(engine_req)
            self.state.active_streams += 1
            try:
                sent_tokens = 0
                async for chunk in stream:
                    if chunk.finish is not None:
                        final = chunk
                    if chunk.error_kind is ErrorKind.OUT_OF_MEMORY and sent_tokens == 0:
                        raise EngineOutOfMemoryError(chunk.error)
                    if chunk.error_kind is ErrorKind.OVERLOADED and sent_tokens == 0:
                        raise QueueFullError(chunk.error)
                    sent_tokens += len(chunk.tokens)
                    if config.log_text:
                        output.append(chunk.text)
                    if chunk.finish is not None:
                        conclude()
                    yield chunk
            finally:
                stream.cancel()  # a no-op once finished
                self.state.stream_ended()
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception as exc:
            code = code_name(exc)
            raise
        finally:
            conclude()

    def reject(self, call: CallInfo, exc: BaseException) -> None:
        """A request a front refused before run() (its own checks: JSON shape, a parameter only it has): the same
        span, metric and log line as a request that run() refuses."""
        span, fields = self._begin(call)
        code = code_name(exc)
        self._end(span, code, call)
        self.metrics.observe(None, code, call.front, call.caller.cls)
        self._log(call, {**fields, "error": str(exc)}, code, None, None, None)

    def _begin(self, call: CallInfo) -> tuple[trace.Span, dict[str, object]]:
        """The request's server span (joined to the caller's traceparent), and its request id and trace id."""
        span = self.tracer.start_span(call.span_name, context=propagate.extract(call.carrier),
                                      kind=trace.SpanKind.SERVER, attributes=call.span_attributes)
        ctx = span.get_span_context()
        return span, {"request_id": call.request_id, "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else None}

    def _record(self, span: trace.Span, chunk: Chunk) -> None:
        span.set_attribute("gen_ai.usage.input_tokens", chunk.prompt_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", chunk.completion_tokens)
        span.set_attribute("gen_ai.response.finish_reasons", [chunk.finish.value] if chunk.finish else [])
        if chunk.timings is None:
            return
        t = chunk.timings
        span.set_attribute("tokenstream.time_to_first_token_ms", t.ttft_ms)
        span.set_attribute("tokenstream.queue_ms", t.queue_ms)
        parent = trace.set_span_in_context(span)
        phases = [("queue", t.arrival_ns, t.prefill_start_ns or t.end_ns)]
        if t.prefill_start_ns:
            phases.append(("prefill", t.prefill_start_ns, t.first_token_ns or t.end_ns))
        if t.first_token_ns:
            phases.append(("decode", t.first_token_ns, t.end_ns))
        for name, start, end in phases:
            self.tracer.start_span(name, context=parent, start_time=start).end(end_time=max(start, end))

    @staticmethod
    def _end(span: trace.Span, code: str, call: CallInfo) -> None:
        if call.front == "grpc":
            span.set_attribute("rpc.grpc.status_code", code_pb2.Code.Value(code))
        else:
            span.set_attribute("http.response.status_code", http_status(code))
        if code not in ("OK", "CANCELLED"):
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()

    def _log(self, call: CallInfo, request: dict[str, object], code: str, final: Chunk | None, prompt: str | None,
             output: str | None) -> None:
        fields: dict[str, object] = {"event": "generate", "front": call.front, "code": code, **request}
        if final is not None:
            fields.update(finish_reason=final.finish.value if final.finish else None,
                          prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens)
            if final.timings is not None:
                t = final.timings
                fields.update(queue_ms=round(t.queue_ms, 3), ttft_ms=round(t.ttft_ms, 3),
                              decode_ms=round(t.decode_ms, 3), total_ms=round(t.total_ms, 3))
            if final.error:
                fields["error"] = final.error
        if prompt is not None:  # only with --log-text: prompts and outputs are private by default
            fields.update(prompt=prompt, output=output)
        log.info("generate finished", extra={"fields": fields})


def _request_attributes(span: trace.Span, request: pb.GenerateRequest, req: GenerationRequest, model: str,
                        call: CallInfo) -> None:
    """The OpenTelemetry GenAI request attributes (semantic conventions for generative AI spans)."""
    s = req.sampling
    attributes: dict[str, object] = {
        "gen_ai.operation.name": "chat" if len(request.messages) else "text_completion",
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.response.id": call.request_id,
        "gen_ai.request.max_tokens": req.max_new_tokens,
        "gen_ai.request.temperature": s.temperature,
        "gen_ai.request.top_p": s.top_p,
        "gen_ai.request.top_k": s.top_k,
        "gen_ai.usage.input_tokens": len(req.prompt_ids),
        "tokenstream.request_id": call.request_id,
        "tokenstream.front": call.front,
        "tokenstream.caller_class": call.caller.cls,
    }
    if s.seed is not None:
        attributes["gen_ai.request.seed"] = s.seed
    if req.stop_sequences:
        attributes["gen_ai.request.stop_sequences"] = list(req.stop_sequences)
    span.set_attributes(attributes)  # type: ignore[arg-type]


def _cancelled_summary(stream: EngineStream, req: GenerationRequest) -> Chunk:
    """What a stream that the caller left had used, from the marks the engine keeps while it runs."""
    m = stream.marks
    return Chunk("", finish=Finish.CANCELLED, prompt_tokens=len(req.prompt_ids), completion_tokens=m.tokens_emitted,
                 timings=Timings(m.arrival_ns, m.prefill_start_ns, m.first_token_ns, time.time_ns()))
