"""GenerationService over grpc.aio: protobuf in, GenerateParams and a CallInfo to the shared lifecycle, chunks out.

Async-generator methods, so the stock OTel interceptor sees every message; exceptions become statuses in errors.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from google.rpc import code_pb2

from service.calls import Front, read_grpc_call
from service.engine.types import Chunk, Finish
from service.errors import (
    FieldViolation,
    InvalidRequestError,
    NotReadyError,
    ShuttingDownError,
    abort,
    stream_error,
)
from service.generation import GenerateRunner, tokenizing
from service.grpc_handlers import register, require_decoded
from service.validation import (
    ConstraintSpec,
    GenerateParams,
    Message,
    Sampling,
    check_tokenize,
    max_new_tokens_limit,
    recommended_sampling,
)
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


GRPC = Front("grpc", "rpc.grpc.status_code", code_pb2.Code.Value, lambda _info: Sampling())  # unset: greedy


def to_params(req: pb.GenerateRequest) -> GenerateParams:
    """The request as the shared model has it. Proto3 scalars without presence read 0 as unset."""
    require_decoded(req)
    s, st, r = req.sampling, req.stopping, req.response
    return GenerateParams(
        prompt=req.prompt,
        messages=tuple(Message(m.role, m.content) for m in req.messages),
        sampling=Sampling(temperature=s.temperature if s.HasField("temperature") else None, top_k=s.top_k or None,
                          top_p=s.top_p or None, repetition_penalty=s.repetition_penalty or None,
                          seed=s.seed if s.HasField("seed") else None),
        max_new_tokens=st.max_new_tokens if st.HasField("max_new_tokens") else None,
        min_new_tokens=st.min_new_tokens,
        time_limit_ms=st.time_limit_ms if st.HasField("time_limit_ms") else None,
        stop_sequences=tuple(st.stop_sequences),
        include_stop_sequence=st.include_stop_sequence,
        logprobs=r.logprobs,
        top_n=r.top_n,
        echo_prompt_tokens=r.echo_prompt_tokens,
        constraint=_constraint(req),
        cache_salt=req.cache_salt,
    )


def _constraint(req: pb.GenerateRequest) -> ConstraintSpec | None:
    """The request's OutputConstraint as the shared model has it; None when no kind is set."""
    if not req.HasField("constraint"):
        return None
    c = req.constraint
    kind = c.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError([FieldViolation("constraint", "set one of json_schema, json_object, regex, "
                                                                "choice or grammar")])
    if kind == "json_object" and not c.json_object:
        raise InvalidRequestError([FieldViolation("constraint.json_object", "must be true when set")])
    value: object = list(c.choice.choices) if kind == "choice" else getattr(c, kind)
    return ConstraintSpec(kind, value, f"constraint.{kind}")


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
        msg.usage.cached_prompt_tokens = chunk.cached_prompt_tokens
        if chunk.timings is not None:
            msg.timings.queue_ms = chunk.timings.queue_ms
            msg.timings.time_to_first_token_ms = chunk.timings.ttft_ms
            msg.timings.decode_ms = chunk.timings.decode_ms
            msg.timings.total_ms = chunk.timings.total_ms
        msg.stop_sequence = chunk.stop_sequence
        if chunk.seed is not None:
            msg.seed = chunk.seed
        msg.error_message = stream_error(chunk.error, chunk.error_kind) if chunk.error else ""
    return msg


GENERATE = f"/{pb.DESCRIPTOR.services_by_name['GenerationService'].full_name}/Generate"


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, runner: GenerateRunner) -> None:
        self.runner = runner
        self.state = runner.state

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        call = read_grpc_call(self.state, context, GRPC, GENERATE.split("/")[1], "Generate")
        try:
            params = to_params(request)
        except InvalidRequestError as exc:
            self.runner.reject(call, exc)
            await abort(context, exc)
        run = self.runner.run(params, call)
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
            require_decoded(request)
            check_tokenize(request.text, self.state.config)
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        enc = await tokenizing(engine.tokenizer.encode_full, request.text)  # up to max_prompt_bytes: off the loop
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
            require_decoded(request)
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
            recommended_sampling=to_sampling_params(recommended_sampling(info.generation_defaults)),
            prefix_cache=pb.PrefixCachePolicy(budget_bytes=info.prefix_cache_bytes,
                                              block_positions=info.prefix_cache_block, scope=info.prefix_cache_scope),
        )


def to_sampling_params(sampling: Sampling | None) -> pb.SamplingParams | None:
    if sampling is None:
        return None
    return pb.SamplingParams(**{k: v for k, v in vars(sampling).items() if v is not None})


def add_to_server(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_..._to_server, but undecodable requests reach the servicer as INVALID_ARGUMENT."""
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    register(server, service, {m.name: getattr(servicer, m.name) for m in service.methods})
