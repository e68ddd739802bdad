"""The asyncio client, over grpc.aio."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc
from tokenstream_client._base import DEFAULT_TARGET, ClientBase, PreparedCall
from tokenstream_client.channel import ChannelOptions, MetadataLike, TLSConfig
from tokenstream_client.errors import TokenstreamError, deadline_exceeded, no_final_message
from tokenstream_client.messages import Delta, GenerationResult, ModelInfo, ResultBuilder, TokenizeResult
from tokenstream_client.request import GenerateParams
from tokenstream_client.retry import DEFAULT_RETRY, RetryPolicy


class _StreamState:
    """Shared by an AsyncGenerateStream and its async generator (which holds no reference to the stream)."""

    def __init__(self) -> None:
        self.call: Any = None  # the grpc.aio.UnaryStreamCall in flight
        self.cancelled = False
        self.attempts = 0
        self.wake = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()
        call = self.call
        if call is not None:
            call.cancel()


def _cancelled_by_us(state: _StreamState) -> bool:
    """grpc.aio raises CancelledError from a read of a cancelled call. It is ours to swallow only when the stream was
    cancelled and the task itself is not being cancelled."""
    task = asyncio.current_task()
    return state.cancelled and (task is None or task.cancelling() == 0)


async def _attempts(
    stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy,
    wait_for_ready: bool | None, state: _StreamState,
) -> AsyncGenerator[Delta, None]:
    received = False  # once any message arrived, nothing is retried
    while not state.cancelled:
        if prepared.deadline.expired():
            raise deadline_exceeded(prepared.request_id, state.attempts)
        state.attempts += 1
        call = stub.Generate(request, timeout=prepared.deadline.remaining(), metadata=prepared.metadata,
                             wait_for_ready=wait_for_ready)
        state.call = call
        if state.cancelled:  # cancel() ran between the check above and now
            call.cancel()
        delay: float | None = None
        try:
            final = False
            async for message in call:
                received = True
                delta = Delta.from_proto(message)
                final = final or delta.is_final
                yield delta
            if not final:
                raise no_final_message(prepared.request_id, state.attempts)
            return
        except grpc.RpcError as rpc_error:
            if state.cancelled:
                return
            error = TokenstreamError.from_rpc_error(rpc_error, request_id=prepared.request_id,
                                                    attempts=state.attempts)
            delay = retry.delay_for(error, state.attempts, received_response=received)
            if delay is None or not prepared.deadline.allows(delay):
                raise error from None
        except asyncio.CancelledError:
            if _cancelled_by_us(state):
                return
            raise
        finally:  # closed early, finalised, failed or done: the call ends here (a no-op when done)
            state.call = None
            call.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.wake.wait(), delay)
            return  # cancelled during the backoff


class AsyncGenerateStream(AsyncIterator[Delta]):
    """The deltas of one Generate call, retried where safe. `async for` it; the call starts on the first
    iteration. aclose(), `async with`, or dropping the last reference cancels the call. cancel() may be called from
    another task; the iteration then ends quietly."""

    def __init__(
        self, stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, prepared: PreparedCall,
        retry: RetryPolicy, wait_for_ready: bool | None,
    ) -> None:
        self.request = request
        self.request_id = prepared.request_id
        self._state = _StreamState()
        self._builder = ResultBuilder()
        self._gen = _attempts(stub, request, prepared, retry, wait_for_ready, self._state)

    @property
    def attempts(self) -> int:
        return self._state.attempts

    @property
    def final(self) -> Delta | None:
        return self._builder.final

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta:
        delta = await self._gen.__anext__()
        self._builder.add(delta)
        return delta

    async def collect(self) -> GenerationResult:
        """Read the rest of the stream; the result covers every delta, including those already iterated."""
        async for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        return self._builder.result(self.request_id, self._state.attempts)

    def cancel(self) -> None:
        """Cancel the call in flight (synchronous, safe from another task on the same loop)."""
        self._state.cancel()

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


class AsyncClient:
    """An asyncio client for tokenstream.v1.GenerationService. Create it inside the event loop that uses it.

    >>> async with AsyncClient("127.0.0.1:50051") as client:
    ...     async for delta in client.generate("Hello", max_new_tokens=16):
    ...         print(delta.text, end="", flush=True)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        tls: TLSConfig | bool | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        metadata: MetadataLike = (),
        options: ChannelOptions = (),
        wait_for_ready: bool | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        """The same arguments as Client."""
        self._base = ClientBase(target, tls=tls, token=token, timeout=timeout, retry=retry, metadata=metadata,
                                options=options, wait_for_ready=wait_for_ready)
        self._owns_channel = channel is None
        if channel is not None:
            self.channel = channel
        elif self._base.tls is not None:
            self.channel = grpc.aio.secure_channel(target, self._base.tls.credentials(), options=self._base.options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=self._base.options)
        self._stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        return self._base.target

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        request: pb.GenerateRequest | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: MetadataLike = (),
        retry: RetryPolicy | None = None,
        **params: Unpack[GenerateParams],
    ) -> AsyncGenerateStream:
        """Stream a completion; see Client.generate."""
        req = self._base._request(prompt, request, params)
        prepared = self._base._prepare(timeout, request_id, metadata)
        return AsyncGenerateStream(self._stub, req, prepared, retry or self._base.retry, self._base.wait_for_ready)

    async def generate_text(
        self,
        prompt: str | None = None,
        *,
        request: pb.GenerateRequest | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        metadata: MetadataLike = (),
        retry: RetryPolicy | None = None,
        **params: Unpack[GenerateParams],
    ) -> GenerationResult:
        """Generate and collect: the full text, token ids, usage and finish reason."""
        async with self.generate(prompt, request=request, timeout=timeout, request_id=request_id, metadata=metadata,
                                 retry=retry, **params) as stream:
            return await stream.collect()

    async def tokenize(
        self, text: str, *, truncate_to: int = 0, return_tokens: bool = False, return_offsets: bool = False,
        timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = (),
    ) -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, truncate_to=truncate_to, return_tokens=return_tokens,
                                     return_offsets=return_offsets)
        response = await self._unary(self._stub.Tokenize, request, timeout, request_id, metadata, self._base.retry)
        return TokenizeResult.from_proto(response)

    async def model_info(
        self, *, timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = ()
    ) -> ModelInfo:
        response = await self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, request_id,
                                     metadata, self._base.retry)
        return ModelInfo.from_proto(response)

    async def health(self, service: str = "", *, timeout: float | None = None,
                     retry: RetryPolicy | None = None) -> str:
        """The grpc.health.v1 status name; see Client.health."""
        response = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout,
                                     None, (), retry or RetryPolicy.disabled())
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    async def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, request_id: str | None,
        metadata: MetadataLike, retry: RetryPolicy,
    ) -> Any:
        prepared = self._base._prepare(timeout, request_id, metadata)
        attempts = 0
        while True:
            attempts += 1
            try:
                return await method(request, timeout=prepared.deadline.remaining(), metadata=prepared.metadata,
                                    wait_for_ready=self._base.wait_for_ready)
            except grpc.RpcError as rpc_error:
                error = TokenstreamError.from_rpc_error(rpc_error, request_id=prepared.request_id, attempts=attempts)
                delay = retry.delay_for(error, attempts, received_response=False)
                if delay is None or not prepared.deadline.allows(delay):
                    raise error from None
            await asyncio.sleep(delay)
