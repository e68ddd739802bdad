"""One Generate request's span, child spans, metrics and JSON log line, whichever front it came through."""

from __future__ import annotations

import logging

from opentelemetry import propagate, trace

from service.calls import CallInfo
from service.engine.types import Chunk, GenerationRequest
from service.errors import code_name
from service.metrics import Metrics
from service.validation import GenerateParams

log = logging.getLogger("tokenstream.requests")


class RequestTelemetry:
    """Where requests are recorded: the tracer and the metrics."""

    def __init__(self, tracer: trace.Tracer, metrics: Metrics) -> None:
        self.tracer = tracer
        self.metrics = metrics

    def begin(self, call: CallInfo) -> RequestRecord:
        return RequestRecord(self, call)

    def reject(self, call: CallInfo, exc: BaseException) -> None:
        """A request a front refused before its lifecycle began: the same span, metric and log line as one that
        the lifecycle refuses."""
        self.begin(call).end(code_name(exc), None, error=str(exc))


class RequestRecord:
    """One request's server span (made here rather than by a transport interceptor, so that a stream the caller
    leaves still gets its usage and child spans before the span ends) and what its log line will say."""

    def __init__(self, telemetry: RequestTelemetry, call: CallInfo) -> None:
        self.telemetry = telemetry
        self.call = call
        self.span = telemetry.tracer.start_span(call.span_name, context=propagate.extract(call.carrier),
                                                kind=trace.SpanKind.SERVER, attributes=call.span_attributes)
        ctx = self.span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x") if ctx.is_valid else ""
        self.fields: dict[str, object] = {"request_id": call.request_id, "trace_id": self.trace_id or None}

    def admitted(self, params: GenerateParams, req: GenerationRequest, model: str) -> None:
        """The OpenTelemetry GenAI request attributes (semantic conventions for generative AI spans)."""
        s, call = req.sampling, self.call
        attributes: dict[str, object] = {
            "gen_ai.operation.name": "chat" if params.messages else "text_completion",
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
            "gen_ai.response.id": call.request_id,
            "gen_ai.request.max_tokens": req.max_new_tokens,
            "gen_ai.request.temperature": s.temperature,
            "gen_ai.request.top_p": s.top_p,
            "gen_ai.request.top_k": s.top_k,
            "gen_ai.usage.input_tokens": len(req.prompt_ids),
            "tokenstream.request_id": call.request_id,
            "tokenstream.front": call.front.name,
            "tokenstream.caller_class": call.caller.cls,
        }
        if s.seed is not None:
            attributes["gen_ai.request.seed"] = s.seed
        if req.stop_sequences:
            attributes["gen_ai.request.stop_sequences"] = list(req.stop_sequences)
        self.span.set_attributes(attributes)  # type: ignore[arg-type]

    def end(self, code: str, final: Chunk | None, prompt: str | None = None, output: str | None = None,
            error: str = "") -> None:
        """Usage and child spans, the front's status attribute, metrics and the log line. `prompt` and `output`
        only with --log-text: prompts and outputs are private by default."""
        if final is not None:
            self._usage(final)
        call, span = self.call, self.span
        span.set_attribute(call.front.status_attribute, call.front.status_value(code))
        if code not in ("OK", "CANCELLED"):
            span.set_status(trace.Status(trace.StatusCode.ERROR, code))
        span.end()
        self.telemetry.metrics.observe(final, code, call.front.name, call.caller.cls)
        fields: dict[str, object] = {"event": "generate", "front": call.front.name, "code": code, **self.fields}
        if error:
            fields["error"] = error
        if final is not None:
            fields.update(finish_reason=final.finish.value if final.finish else None,
                          prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
                          cached_prompt_tokens=final.cached_prompt_tokens)
            if final.timings is not None:
                t = final.timings
                fields.update(queue_ms=round(t.queue_ms, 3), ttft_ms=round(t.ttft_ms, 3),
                              decode_ms=round(t.decode_ms, 3), total_ms=round(t.total_ms, 3))
            if final.error:
                fields["error"] = final.error
        if prompt is not None:
            fields.update(prompt=prompt, output=output)
        log.info("generate finished", extra={"fields": fields})

    def _usage(self, chunk: Chunk) -> None:
        span = self.span
        span.set_attribute("gen_ai.usage.input_tokens", chunk.prompt_tokens)
        # Of those, reused from the prefix cache instead of prefilled (OpenAI's prompt_tokens_details.cached_tokens).
        span.set_attribute("tokenstream.usage.cached_input_tokens", chunk.cached_prompt_tokens)
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
        tracer = self.telemetry.tracer
        for name, start, end in phases:
            tracer.start_span(name, context=parent, start_time=start).end(end_time=max(start, end))
