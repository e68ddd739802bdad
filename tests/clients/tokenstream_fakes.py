"""A scripted fake GenerationService on a real grpc.aio server, for the SDK's retry and metadata tests."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from tokenstream.v1 import generation_pb2 as pb


@dataclass(frozen=True)
class Step:
    """What the fake does for one call: send `tokens` one-token messages, then either a final message (code None)
    or fail with `code`, optionally with RetryInfo or BadRequest details."""

    tokens: int = 3
    code: grpc.StatusCode | None = None
    message: str = "scripted failure"
    retry_delay_s: float | None = None
    violations: tuple[tuple[str, str], ...] = ()


def _status(step: Step) -> grpc.Status:
    assert step.code is not None
    status = status_pb2.Status(code=step.code.value[0], message=step.message)
    if step.retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(int(step.retry_delay_s * 1000))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if step.violations:
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in step.violations]))
    return rpc_status.to_status(status)


class FakeGenerationService:
    """Plays `script` one step per call (then succeeds), recording each call's metadata and arrival time.

    Registered with a generic handler under the real service's name; the client cannot tell it apart."""

    def __init__(self) -> None:
        self.script: list[Step] = []
        self.calls: list[dict[str, str]] = []  # each call's metadata
        self.arrivals: list[float] = []  # each call's time.monotonic() on arrival
        self.lock = threading.Lock()

    def reset(self, *steps: Step) -> None:
        with self.lock:
            self.script = list(steps)
            self.calls = []
            self.arrivals = []

    def _next(self, context: grpc.aio.ServicerContext) -> Step:
        with self.lock:
            self.arrivals.append(time.monotonic())
            self.calls.append({k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)})
            return self.script.pop(0) if self.script else Step()

    async def generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        step = self._next(context)
        for i in range(step.tokens):
            yield pb.GenerateResponse(text=f"t{i} ", tokens=[pb.Token(id=100 + i, text=f"t{i} ")])
        if step.code is None:
            yield pb.GenerateResponse(finish_reason=pb.FINISH_REASON_MAX_TOKENS,
                                      usage=pb.Usage(prompt_tokens=2, completion_tokens=step.tokens),
                                      timings=pb.Timings(total_ms=1.0))
            return
        status = _status(step)
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        step = self._next(context)
        if step.code is not None:
            status = _status(step)
            await context.abort(status.code, status.details, status.trailing_metadata)
        return pb.TokenizeResponse(token_count=2, ids=[1, 2])

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler("tokenstream.v1.GenerationService", {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, request_deserializer=pb.GenerateRequest.FromString,
                response_serializer=pb.GenerateResponse.SerializeToString),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.tokenize, request_deserializer=pb.TokenizeRequest.FromString,
                response_serializer=pb.TokenizeResponse.SerializeToString),
        })


class FakeServer:
    """A grpc.aio server with the fake service, on its own event loop in a background thread."""

    def __init__(self) -> None:
        self.service = FakeGenerationService()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: grpc.aio.Server = self._call(self._start())
        self.target = f"127.0.0.1:{self.port}"

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.service.handler(),))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(30)

    def close(self) -> None:
        try:
            self._call(self.server.stop(0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
