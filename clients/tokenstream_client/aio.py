"""The asyncio client, over grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc
from tokenstream_client._base import ClientBase, GenerateOptions, PreparedCall, StreamBase, StreamCall
from tokenstream_client.channel import MetadataLike
from tokenstream_client.messages import Delta, GenerationResult, ModelInfo, TokenizeResult
from tokenstream_client.retry import RetryPolicy


def _cancelled_by_us(state: StreamCall) -> bool:
    """grpc.aio raises CancelledError from a read of a cancelled call. It is ours to swallow only when the stream was
    cancelled and the task itself is not being cancelled."""
    task = asyncio.current_task()
    return state.cancelled and (task is None or task.cancelling() == 0)


async def _deltas(
    stub: pb_grpc.GenerationServiceStub, state: StreamCall, wake: asyncio.Event
) -> AsyncGenerator[Delta, None]:
    """The I/O of a Generate call's attempts; StreamCall makes every decision."""
    while not state.cancelled:
        call = state.open(stub)
        try:
            async for message in call:
                yield state.delta(message)
            state.done()
            return
        except grpc.RpcError as rpc_error:
            delay = state.failed(rpc_error)
            if delay is None:
                return
        except asyncio.CancelledError:
            if _cancelled_by_us(state):
                return
            raise
        finally:
            state.close(call)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), delay)
            return  # cancelled during the backoff


class AsyncGenerateStream(StreamBase, AsyncIterator[Delta]):
    """The deltas of one Generate call, retried where safe. `async for` it; the call starts on the first
    iteration. aclose(), `async with`, or dropping the last reference cancels the call. cancel() may be called from
    another task; the iteration then ends quietly."""

    def __init__(
        self, stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, prepared: PreparedCall,
        retry: RetryPolicy, wait_for_ready: bool | None,
    ) -> None:
        wake = asyncio.Event()
        super().__init__(StreamCall(request, prepared, retry, wait_for_ready, wake))
        self._gen = _deltas(stub, self._state, wake)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta:
        return await self._gen.__anext__()

    async def collect(self) -> GenerationResult:
        """Read the rest of the stream; the result covers every delta, including those already iterated."""
        async for _ in self:
            pass
        return self.result()

    async def aclose(self) -> None:
        self._state.cancel()
        with contextlib.suppress(RuntimeError):  # being iterated by another task: the cancelled call ends it
            await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # The generator itself is finalised by the event loop's async-generator hooks; cancel the call now.
        state = getattr(self, "_state", None)
        if state is not None and not state.cancelled:
            with contextlib.suppress(Exception):
                state.cancel()


class AsyncClient(ClientBase[grpc.aio.Channel, AsyncGenerateStream]):
    """An asyncio client for tokenstream.v1.GenerationService, with the same arguments as Client. Create it inside
    the event loop that uses it.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     async for delta in client.generate("Hello", max_new_tokens=16):
    ...         print(delta.text, end="", flush=True)
    """

    _grpc = grpc.aio

    def _stream(self, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy) -> AsyncGenerateStream:
        return AsyncGenerateStream(self._stub, request, prepared, retry, self._wait_for_ready)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def generate_text(
        self, prompt: str | None = None, **kwargs: Unpack[GenerateOptions]
    ) -> GenerationResult:
        """Generate and collect: the full text, token ids, usage and finish reason. Takes generate()'s arguments."""
        async with self.generate(prompt, **kwargs) as stream:
            return await stream.collect()

    async def tokenize(
        self, text: str, *, truncate_to: int = 0, return_tokens: bool = False, return_offsets: bool = False,
        timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = (),
    ) -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, truncate_to=truncate_to, return_tokens=return_tokens,
                                     return_offsets=return_offsets)
        return TokenizeResult.from_proto(await self._unary(self._stub.Tokenize, request, timeout, request_id,
                                                           metadata))

    async def model_info(
        self, *, timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = ()
    ) -> ModelInfo:
        return ModelInfo.from_proto(
            await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, request_id, metadata))

    async def health(self, service: str = "", *, timeout: float | None = None,
                     retry: RetryPolicy | None = None) -> str:
        """The grpc.health.v1 status name; see Client.health."""
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout,
                                     None, (), retry or RetryPolicy.disabled())
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, request_id: str | None,
        metadata: MetadataLike, retry: RetryPolicy | None = None,
    ) -> Any:
        attempts = self._attempts(timeout, request_id, metadata, retry)
        while True:
            try:
                return await method(request, **attempts.next())
            except grpc.RpcError as rpc_error:
                delay = attempts.backoff(rpc_error)
            await asyncio.sleep(delay)
