"""GenerationService over grpc.aio: async-generator methods, so the stock OTel interceptor sees every message."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from service.config import Config
from service.engine.engine import Engine
from service.engine.loader import LoadedModel
from service.engine.types import Chunk, ErrorKind, Finish
from service.errors import (
    DeadlineTooShortError,
    EngineOutOfMemoryError,
    InvalidRequestError,
    NotReadyError,
    ShuttingDownError,
    abort,
    to_status,
)
from service.metrics import Metrics
from service.validation import check_decodable, tolerant, validate_generate, validate_tokenize
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger("tokenstream.requests")

FINISH_TO_PROTO = {
    Finish.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    Finish.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    Finish.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    Finish.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
    Finish.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
    Finish.ERROR: pb.FINISH_REASON_ERROR,
}


@dataclass
class ServerState:
    """What the transport knows about the engine's life: loading, serving, draining."""

    config: Config
    model: LoadedModel | None = None
    engine: Engine | None = None
    draining: bool = False
    active_streams: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def ready_engine(self) -> tuple[Engine, LoadedModel]:
        if self.draining:
            raise ShuttingDownError("the server is shutting down; retry on another instance")
        if self.engine is None or self.model is None:
            raise NotReadyError("the model is still loading; retry shortly")
        return self.engine, self.model


def to_response(chunk: Chunk) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(text=chunk.text, prompt_token_ids=chunk.prompt_token_ids)
    for t in chunk.tokens:
        token = msg.tokens.add(id=t.id, text=t.text)
        if t.logprob is not None:
            token.logprob = t.logprob
        for alt in t.top:
            token.top_tokens.add(id=alt.id, text=alt.text, logprob=alt.logprob)
    if chunk.finish is not None:
        msg.finish_reason = FINISH_TO_PROTO[chunk.finish]
        msg.usage.prompt_tokens = chunk.prompt_tokens
        msg.usage.completion_tokens = chunk.completion_tokens
        if chunk.timings is not None:
            msg.timings.queue_ms = chunk.timings.queue_ms
            msg.timings.time_to_first_token_ms = chunk.timings.ttft_ms
            msg.timings.decode_ms = chunk.timings.decode_ms
            msg.timings.total_ms = chunk.timings.total_ms
        msg.stop_sequence = chunk.stop_sequence
        if chunk.seed is not None:
            msg.seed = chunk.seed
        msg.error_message = chunk.error
    return msg


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, state: ServerState, tracer: trace.Tracer, metrics: Metrics) -> None:
        self.state = state
        self.tracer = tracer
        self.metrics = metrics

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        config = self.state.config
        metadata = dict(context.invocation_metadata() or ())
        request_id = str(metadata.get("x-request-id") or uuid.uuid4().hex)
        span = trace.get_current_span()
        final: Chunk | None = None
        code = grpc.StatusCode.OK
        output: list[str] = []
        try:
            engine, model = self.state.ready_engine()
            engine_request, limit_ms = validate_generate(request, config, model.tokenizer)
            now = time.monotonic()
            deadline = now + limit_ms / 1000.0
            remaining = context.time_remaining()
            if remaining is not None:  # end gracefully with TIME_LIMIT just before the caller gives up
                # The engine checks deadlines between steps, so keep at least two steps in hand.
                margin = max(config.deadline_margin_ms / 1000.0, 2 * engine.step_seconds)
                deadline = min(deadline, now + remaining - margin)
                wait = engine.estimate_first_token_s(len(engine_request.prompt_ids))
                if wait > remaining:  # don't make the caller wait for nothing
                    raise DeadlineTooShortError(
                        f"the deadline ({remaining * 1000:.0f} ms) is shorter than the estimated time to the first "
                        f"token ({wait * 1000:.0f} ms); retry with a longer deadline or later")
            fault = metadata.get("x-tokenstream-debug-fault") if config.debug_faults else None
            engine_request = dataclasses.replace(engine_request, deadline=deadline, request_id=request_id,
                                                 debug_fault=str(fault) if fault else None)
            span.set_attribute("gen_ai.request.max_tokens", engine_request.max_new_tokens)
            span.set_attribute("gen_ai.usage.input_tokens", len(engine_request.prompt_ids))
            span.set_attribute("tokenstream.request_id", request_id)
            self.state.active_streams += 1
            try:
                sent_tokens = 0
                async for chunk in engine.generate(engine_request):
                    if chunk.error_kind is ErrorKind.OUT_OF_MEMORY and sent_tokens == 0:
                        raise EngineOutOfMemoryError(chunk.error)
                    if chunk.finish is not None:
                        final = chunk
                        self._record(span, chunk)
                    sent_tokens += len(chunk.tokens)
                    if config.log_text:
                        output.append(chunk.text)
                    yield to_response(chunk)
            finally:
                self.state.active_streams -= 1
                if self.state.draining and self.state.active_streams == 0:
                    self.state.drained.set()
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 -- every failure is mapped to a status, in errors.py
            code = to_status(exc).code
            await abort(context, exc)
        finally:
            self.metrics.observe(final, code.name)
            self._log(request_id, span, code, final, request.prompt if config.log_text else None,
                      "".join(output) if config.log_text else None)

    def _log(self, request_id: str, span: trace.Span, code: grpc.StatusCode, final: Chunk | None,
             prompt: str | None, output: str | None) -> None:
        ctx = span.get_span_context()
        fields: dict[str, object] = {
            "event": "generate", "request_id": request_id, "grpc_code": code.name,
            "trace_id": format(ctx.trace_id, "032x") if ctx.is_valid else None,
        }
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

    def _record(self, span: trace.Span, chunk: Chunk) -> None:
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

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        try:
            _, model = self.state.ready_engine()
            validate_tokenize(request, self.state.config)
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        enc = model.tokenizer.encode_full(request.text)
        keep = slice(-request.truncate_to, None) if request.truncate_to else slice(None)
        ids, tokens, offsets = enc.ids[keep], enc.tokens[keep], enc.offsets[keep]
        response = pb.TokenizeResponse(token_count=len(ids), ids=ids)
        if request.return_tokens:
            response.tokens.extend(tokens)
        if request.return_offsets:
            response.offsets.extend(pb.Offset(start=s, end=e) for s, e in offsets)
        return response

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        try:
            check_decodable(request)
            engine, model = self.state.ready_engine()
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        cfg = self.state.config
        return pb.GetModelInfoResponse(
            model_name=model.name,
            architecture=model.config.architecture,
            max_context_length=cfg.max_context,
            max_new_tokens=cfg.max_new_tokens_limit,
            vocab_size=model.config.vocab_size,
            eos_token_ids=list(model.config.eos_token_ids),
            dtype=engine.config.dtype,
            device=engine.config.device,
            max_batch_size=engine.config.max_slots,
            has_chat_template=bool(model.tokenizer.chat_template),
            max_top_n=cfg.max_top_n,
        )


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_..._to_server, but undecodable requests reach the servicer as INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    handlers = {}
    for method in service.methods:
        request_cls, response_cls = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(getattr(servicer, method.name),
                                     request_deserializer=tolerant(request_cls.FromString),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
