"""vLLM's gRPC contract (`vllm.grpc.engine.VllmEngine`, the stubs of the smg-grpc-proto package) beside ours, on the
same port and engine: what llm-d's router and the inference gateway's gRPC examples speak.

A translator like service/servicer.py: vLLM's GenerateRequest into the shared GenerateParams (service/validation.py)
and the shared lifecycle (service/generation.py), chunks back into vLLM's messages. Every field we support is
mapped; a set field we do not support is refused by name (INVALID_ARGUMENT), never ignored; an RPC we do not serve
answers UNIMPLEMENTED. GetLoads reads the same engine figures as the Model Server Protocol's gauges
(service/metrics.py).

The mapping, field by field (sampling_params.*): temperature (unset: the model's recommendation, else 1, as vLLM),
top_p, top_k (0 and -1: no limit), repetition_penalty, max_tokens, min_tokens, stop, include_stop_str_in_output,
seed (non-negative), logprobs (0: the sampled token's; k: and the top k), n (0 or 1). skip_special_tokens and
spaces_between_special_tokens shape detokenized text, which this contract does not carry (token ids only): accepted,
no effect. Refused when set: min_p, frequency_penalty, presence_penalty, stop_token_ids, ignore_eos, n > 1,
logprobs -1, prompt_logprobs, logit_bias, truncate_prompt_tokens, the structured-output constraint and
grammar_from_first_token, and on the request kv_transfer_params(_json), mm_inputs, extra_mm_inputs, media_refs and a
data_parallel_rank other than 0. Finish reasons: "length" (max_tokens, context), "stop" (EOS, a stop string, with
matched_stop_str), "abort" (Abort, cancelled, the time limit), "error". Streaming (stream=true) sends a
GenerateStreamChunk per message with its new token ids, then a GenerateComplete whose output_ids are the last
message's (as vLLM's delta outputs have it); otherwise one GenerateComplete with every output id.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from typing import Any

import grpc
from google.rpc import code_pb2
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc

from service.calls import Front, read_grpc_call, with_request_id
from service.engine.api import KV_BLOCK, EngineClient
from service.engine.types import Chunk, Finish
from service.errors import FieldViolation, InvalidRequestError, NotReadyError, ShuttingDownError, abort
from service.generation import GenerateLifecycle, GenerateRunner
from service.grpc_handlers import register, require_decoded
from service.http.requests import openai_sampling_defaults
from service.validation import GenerateParams, Sampling

SERVICE = vpb.DESCRIPTOR.services_by_name["VllmEngine"]
SERVICE_NAME = SERVICE.full_name  # "vllm.grpc.engine.VllmEngine"
SERVED = ("Generate", "Abort", "HealthCheck", "GetModelInfo", "GetServerInfo", "GetLoads")
# Unset sampling means what it means on vLLM: the model's recommended sampling, else temperature 1.
VLLM = Front("vllm", "rpc.grpc.status_code", code_pb2.Code.Value, openai_sampling_defaults)

FINISH = {
    Finish.MAX_TOKENS: "length", Finish.CONTEXT_LENGTH: "length", Finish.EOS_TOKEN: "stop",
    Finish.STOP_SEQUENCE: "stop", Finish.CANCELLED: "abort", Finish.TIME_LIMIT: "abort", Finish.ERROR: "error",
}
# The shared validation's field paths, as this contract spells them.
FIELD_NAMES = {
    "sampling.": "sampling_params.", "stopping.max_new_tokens": "sampling_params.max_tokens",
    "stopping.min_new_tokens": "sampling_params.min_tokens", "stopping.stop_sequences": "sampling_params.stop",
    "response.top_n": "sampling_params.logprobs", "prompt": "text", "prompt_ids": "tokenized.input_ids",
}
# Set fields that are refused: (path, what it is set to mean).
_UNSUPPORTED_SAMPLING = ("min_p", "frequency_penalty", "presence_penalty", "stop_token_ids", "ignore_eos",
                         "prompt_logprobs", "logit_bias", "truncate_prompt_tokens", "grammar_from_first_token")
_UNSUPPORTED_REQUEST = ("kv_transfer_params", "kv_transfer_params_json", "mm_inputs", "extra_mm_inputs",
                        "media_refs")


def _is_set(msg: Any, name: str) -> bool:
    f = msg.DESCRIPTOR.fields_by_name[name]
    if f.is_repeated:
        return len(getattr(msg, name)) > 0
    if f.has_presence:
        return bool(msg.HasField(name))
    return bool(getattr(msg, name))


def to_params(req: vpb.GenerateRequest) -> GenerateParams:
    """The request as the shared model has it (a tokenized input as prompt_ids)."""
    require_decoded(req)
    bad: list[FieldViolation] = []
    s = req.sampling_params
    for name in _UNSUPPORTED_SAMPLING:
        if _is_set(s, name):
            bad.append(FieldViolation(f"sampling_params.{name}", "is not supported by this server; leave it unset"))
    if s.WhichOneof("constraint"):
        bad.append(FieldViolation(f"sampling_params.{s.WhichOneof('constraint')}",
                                  "structured output is not supported on this contract; leave it unset"))
    if s.n > 1:
        bad.append(FieldViolation("sampling_params.n", "only one sequence per request (0 or 1)"))
    if s.HasField("logprobs") and s.logprobs < 0:
        bad.append(FieldViolation("sampling_params.logprobs", "-1 (the whole vocabulary) is not supported"))
    if s.HasField("seed") and s.seed < 0:
        bad.append(FieldViolation("sampling_params.seed", "must be non-negative"))
    for name in _UNSUPPORTED_REQUEST:
        if _is_set(req, name):
            bad.append(FieldViolation(name, "is not supported by this server; leave it unset"))
    if req.HasField("data_parallel_rank") and req.data_parallel_rank != 0:
        bad.append(FieldViolation("data_parallel_rank", "this server has one rank, 0"))
    which = req.WhichOneof("input")
    ids = tuple(req.tokenized.input_ids) if which == "tokenized" else None
    if which is None:
        bad.append(FieldViolation("text", "set text or tokenized"))
    if bad:
        raise InvalidRequestError(bad)
    return GenerateParams(
        prompt=req.text if ids is None else "",
        prompt_ids=ids,
        sampling=Sampling(temperature=s.temperature if s.HasField("temperature") else None,
                          top_k=s.top_k or None, top_p=s.top_p or None,
                          repetition_penalty=s.repetition_penalty or None,
                          seed=s.seed if s.HasField("seed") else None),
        max_new_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        min_new_tokens=s.min_tokens,
        stop_sequences=tuple(s.stop),
        include_stop_sequence=s.include_stop_str_in_output,
        logprobs=s.HasField("logprobs"),
        top_n=s.logprobs if s.HasField("logprobs") else 0,
    )


def _renamed(exc: InvalidRequestError) -> InvalidRequestError:
    def name(path: str) -> str:
        for ours, theirs in FIELD_NAMES.items():
            if path == ours.rstrip(".") or path.startswith(ours if ours.endswith(".") else (ours + "[", ours + ".")):
                return theirs + path[len(ours):]
        return path

    return InvalidRequestError([FieldViolation(name(v.field), v.description) for v in exc.violations])


def _logprobs(chunks: list[Chunk], params: GenerateParams) -> vpb.OutputLogProbs | None:
    if not params.logprobs:
        return None
    out = vpb.OutputLogProbs()
    for chunk in chunks:
        for t in chunk.tokens:
            out.token_ids.append(t.id)
            out.token_logprobs.append(t.logprob if t.logprob is not None else 0.0)
            if params.top_n:
                out.top_logprobs.add(values=[a.logprob for a in t.top], token_ids=[a.id for a in t.top])
    return out


def _complete(final: Chunk, output: list[Chunk], params: GenerateParams) -> vpb.GenerateResponse:
    assert final.finish is not None
    complete = vpb.GenerateComplete(
        output_ids=[t.id for c in output for t in c.tokens], finish_reason=FINISH[final.finish],
        prompt_tokens=final.prompt_tokens, completion_tokens=final.completion_tokens,
        output_logprobs=_logprobs(output, params))
    if final.stop_sequence:
        complete.matched_stop_str = final.stop_sequence
    return vpb.GenerateResponse(complete=complete)


class VllmEngineServicer(vpb_grpc.VllmEngineServicer):
    """vllm.grpc.engine.VllmEngine on the shared runner. Abort ends the named requests' streams ("abort")."""

    def __init__(self, runner: GenerateRunner) -> None:
        self.runner = runner
        self.state = runner.state
        self.started = time.monotonic()
        self.last_receive = 0.0
        self._running: dict[str, GenerateLifecycle] = {}
        self._aborted: set[str] = set()

    async def Generate(self, request: vpb.GenerateRequest,  # noqa: N802 -- gRPC method names
                       context: grpc.aio.ServicerContext) -> AsyncIterator[vpb.GenerateResponse]:
        self.last_receive = time.time()
        call = read_grpc_call(self.state, context, VLLM, SERVICE_NAME, "Generate")
        try:
            params = to_params(request)
        except InvalidRequestError as exc:
            self.runner.reject(call, exc)
            await abort(context, exc)
        call = with_request_id(call, request.request_id)
        life = GenerateLifecycle(self.runner, params, call)
        rid = request.request_id
        if rid:
            self._running[rid] = life
        run = life.chunks()
        output: list[Chunk] = []
        try:
            async for chunk in run:
                if rid in self._aborted and life.stream is not None:
                    life.stream.cancel()  # ends at the engine's next step, with a final chunk: "abort"
                output.append(chunk)
                if request.stream and chunk.tokens:
                    yield vpb.GenerateResponse(chunk=vpb.GenerateStreamChunk(
                        token_ids=[t.id for t in chunk.tokens], prompt_tokens=len(life.request.prompt_ids)
                        if life.request is not None else 0,
                        completion_tokens=sum(len(c.tokens) for c in output),
                        output_logprobs=_logprobs([chunk], params)))
                if chunk.finish is not None:
                    yield _complete(chunk, [chunk] if request.stream else output, params)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 -- every failure is mapped to a status, in errors.py
            await abort(context, _renamed(exc) if type(exc) is InvalidRequestError else exc)
        finally:
            await run.aclose()
            if rid and self._running.get(rid) is life:
                del self._running[rid]
                self._aborted.discard(rid)

    async def Abort(self, request: vpb.AbortRequest, context: grpc.aio.ServicerContext) -> vpb.AbortResponse:  # noqa: N802 -- gRPC method names
        """Ends the named requests that are running here; ids not running here are no error (as on vLLM)."""
        try:
            require_decoded(request)
        except InvalidRequestError as exc:
            await abort(context, exc)
        for rid in request.request_ids:
            life = self._running.get(rid)
            if life is None:
                continue
            self._aborted.add(rid)
            if life.stream is not None:
                life.stream.cancel()
        return vpb.AbortResponse()

    async def HealthCheck(self, request: vpb.HealthCheckRequest,  # noqa: N802 -- gRPC method names
                          context: grpc.aio.ServicerContext) -> vpb.HealthCheckResponse:
        try:
            self.state.ready_engine()
        except (NotReadyError, ShuttingDownError) as exc:
            return vpb.HealthCheckResponse(healthy=False, message=str(exc))
        return vpb.HealthCheckResponse(healthy=True, message="serving")

    def _engine(self) -> EngineClient:
        return self.state.ready_engine()

    async def GetModelInfo(self, request: vpb.GetModelInfoRequest,  # noqa: N802 -- gRPC method names
                           context: grpc.aio.ServicerContext) -> vpb.GetModelInfoResponse:
        try:
            require_decoded(request)
            info, cfg = self._engine().info, self.state.config
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        max_input = info.max_context - 1
        if cfg.max_prompt_tokens:
            max_input = min(max_input, cfg.max_prompt_tokens)
        return vpb.GetModelInfoResponse(
            model_path=info.name, is_generation=True, max_context_length=info.max_context,
            vocab_size=info.vocab_size, supports_vision=False, served_model_name=info.name,
            model_type=info.architecture, architectures=[info.architecture], eos_token_ids=list(info.eos_token_ids),
            max_req_input_len=max_input, default_sampling_params_json=json.dumps(info.generation_defaults))

    async def GetServerInfo(self, request: vpb.GetServerInfoRequest,  # noqa: N802 -- gRPC method names
                            context: grpc.aio.ServicerContext) -> vpb.GetServerInfoResponse:
        try:
            require_decoded(request)
            engine = self._engine()
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        return vpb.GetServerInfoResponse(
            active_requests=self.state.active_streams, is_paused=self.state.draining,
            last_receive_timestamp=self.last_receive, uptime_seconds=time.monotonic() - self.started,
            server_type="tokenstream", data_parallel_size=1, block_size=KV_BLOCK,
            model_dtype=engine.info.dtype, max_num_seqs=engine.info.max_slots)

    async def GetLoads(self, request: vpb.GetLoadsRequest,  # noqa: N802 -- gRPC method names
                       context: grpc.aio.ServicerContext) -> vpb.GetLoadsResponse:
        """The figures the Model Server Protocol's gauges show (service/metrics.py), for rank 0, the only one."""
        try:
            require_decoded(request)
            s = self._engine().stats()
        except (NotReadyError, ShuttingDownError, InvalidRequestError) as exc:
            await abort(context, exc)
        response = vpb.GetLoadsResponse(timestamp=datetime.now(UTC).isoformat(), version=version("tokenstream"),
                                        dp_rank_count=1)
        if not request.HasField("dp_rank") or request.dp_rank == 0:
            response.loads.add(
                dp_rank=0, num_running_reqs=s.running, num_waiting_reqs=s.waiting,
                num_total_reqs=s.running + s.waiting, num_used_tokens=s.used_positions,
                max_total_num_tokens=s.kv_blocks * KV_BLOCK, token_usage=s.kv_usage,
                max_running_requests=s.max_slots)
        return response


def _unimplemented(name: str) -> Callable[..., Any]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{SERVICE_NAME}/{name} is not served by tokenstream; "
                            f"it serves {', '.join(SERVED)}")

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await unary(request, context)
        yield None  # unreachable: abort raises

    return streaming if SERVICE.methods_by_name[name].server_streaming else unary


def add_to_server(servicer: VllmEngineServicer, server: grpc.aio.Server) -> None:
    """Every method of the contract: those in SERVED from the servicer, the rest UNIMPLEMENTED, naming them."""
    register(server, SERVICE, {m.name: getattr(servicer, m.name) if m.name in SERVED else _unimplemented(m.name)
                               for m in SERVICE.methods})
