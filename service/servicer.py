"""GenerationService over grpc.aio: async-generator methods, so the stock OTel interceptor sees every message.

The gRPC front only translates: metadata and deadline in, chunks out as GenerateResponse messages, exceptions to
statuses (errors.py). The request's life itself is service/generation.py, shared with the HTTP front.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc

from service.callers import bearer_token, identify, peer_ip
from service.engine.types import Chunk, Finish
from service.errors import InvalidRequestError, NotReadyError, ShuttingDownError, abort
from service.generation import CallInfo, Generations, ServerState
from service.validation import check_decodable, max_new_tokens_limit, tolerant, validate_tokenize
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

FINISH_TO_PROTO = {
    Finish.MAX_TOKENS: pb.FINISH_REASON_MAX_TOKENS,
    Finish.EOS_TOKEN: pb.FINISH_REASON_EOS_TOKEN,
    Finish.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    Finish.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
    Finish.CONTEXT_LENGTH: pb.FINISH_REASON_CONTEXT_LENGTH,
    Finish.CANCELLED: pb.FINISH_REASON_CANCELLED,
    Finish.ERROR: pb.FINISH_REASON_ERROR,
}


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


GENERATE = f"/{pb.DESCRIPTOR.services_by_name['GenerationService'].full_name}/Generate"


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, generations: Generations) -> None:
        self.generations = generations
        self.state: ServerState = generations.state

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        token = bearer_token(metadata) if self.state.auth_on else None
        caller = identify(self.state.config, metadata, peer_ip(context.peer() or ""), token)
        call = CallInfo(request_id=metadata.get("x-request-id") or uuid.uuid4().hex,
                        remaining_s=context.time_remaining(), front="grpc", caller=caller, span_name=GENERATE,
                        carrier=metadata,
                        span_attributes={"rpc.system": "grpc", "rpc.service": GENERATE.split("/")[1],
                                         "rpc.method": "Generate"})
        run = self.generations.run(request, call)
        try:
            async for chunk in run:
                yield to_response(chunk)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 -- every failure is mapped to a status, in errors.py
            await abort(context, exc)
        finally:
            # When the caller leaves while a message is being sent, grpc drops this generator without closing the
            # one inside it; close it now, so the request's span and log are written at once.
            await run.aclose()

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        try:
            engine = self.state.ready_engine()
            validate_tokenize(request, self.state.config)
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        enc = engine.tokenizer.encode_full(request.text)
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
            engine = self.state.ready_engine()
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        cfg, info = self.state.config, engine.info
        return pb.GetModelInfoResponse(
            model_name=info.name,
            architecture=info.architecture,
            max_context_length=info.max_context,
            max_new_tokens=max_new_tokens_limit(cfg, info.max_context),
            vocab_size=info.vocab_size,
            eos_token_ids=list(info.eos_token_ids),
            dtype=info.dtype,
            device=info.device,
            max_batch_size=info.max_slots,
            has_chat_template=info.has_chat_template,
            max_top_n=cfg.max_top_n,
            recommended_sampling=recommended_sampling(info.generation_defaults),
        )


def recommended_sampling(defaults: dict[str, object]) -> pb.SamplingParams | None:
    """generation_config-style defaults as SamplingParams; None when the model recommends no sampling."""
    if not defaults.get("do_sample", "temperature" in defaults):
        return None
    params = pb.SamplingParams()
    for key, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("repetition_penalty", float)):
        value = defaults.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(params, key, kind(value))
    return params


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
