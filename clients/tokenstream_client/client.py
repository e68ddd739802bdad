"""The synchronous client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
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
    """Shared by a GenerateStream and its generator, so that the generator holds no reference to the stream:
    dropping the last reference to the stream then finalises it at once, cancelling the call."""

    def __init__(self) -> None:
        self.call: Any = None  # the attempt in flight: a grpc.Call that is also an iterator
        self.cancelled = False
        self.attempts = 0
        self.wake = threading.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()
        call = self.call
        if call is not None:
            call.cancel()


def _attempts(
    stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy,
    wait_for_ready: bool | None, state: _StreamState,
) -> Generator[Delta, None, None]:
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
            for message in call:
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
        finally:  # closed early, garbage-collected, failed or done: the call ends here (a no-op when done)
            state.call = None
            call.cancel()
        if state.wake.wait(delay):
            return  # cancelled during the backoff


class GenerateStream(Iterator[Delta]):
    """The deltas of one Generate call, retried where safe.

    Iterate it for Delta objects; the call starts on the first iteration. Closing it (close(), a `with` block, or
    dropping the last reference) cancels the call, and the server stops decoding for it. cancel() may be called
    from another thread; the iteration then ends quietly.
    """

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
        """The final message, once it has been received."""
        return self._builder.final

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Delta:
        delta = next(self._gen)
        self._builder.add(delta)
        return delta

    def collect(self) -> GenerationResult:
        """Read the rest of the stream; the result covers every delta, including those already iterated."""
        for _ in self:
            pass
        return self.result()

    def result(self) -> GenerationResult:
        """The collected result; ValueError before the final message."""
        return self._builder.result(self.request_id, self._state.attempts)

    def cancel(self) -> None:
        """Cancel the call in flight; safe from any thread."""
        self._state.cancel()

    def close(self) -> None:
        self._state.cancel()
        with contextlib.suppress(ValueError):  # being iterated in another thread: the cancelled call ends it
            self._gen.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None and not state.cancelled:
            self.close()


class Client:
    """A synchronous client for tokenstream.v1.GenerationService.

    >>> with Client("127.0.0.1:50051") as client:
    ...     for delta in client.generate("Hello", max_new_tokens=16):
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
        channel: grpc.Channel | None = None,
    ) -> None:
        """target: "host:port" or "dns:///name:port" (round-robin over its addresses). tls: True for the default
        roots, or a TLSConfig. token: sent as `authorization: Bearer <token>`. timeout: default deadline of each
        call in seconds (None: none). metadata: sent with every call. channel: use this channel instead (it is not
        closed by close())."""
        self._base = ClientBase(target, tls=tls, token=token, timeout=timeout, retry=retry, metadata=metadata,
                                options=options, wait_for_ready=wait_for_ready)
        self._owns_channel = channel is None
        if channel is not None:
            self.channel = channel
        elif self._base.tls is not None:
            self.channel = grpc.secure_channel(target, self._base.tls.credentials(), options=self._base.options)
        else:
            self.channel = grpc.insecure_channel(target, options=self._base.options)
        self._stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def target(self) -> str:
        return self._base.target

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

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
    ) -> GenerateStream:
        """Stream a completion. Keywords are GenerateParams (max_new_tokens, temperature, top_k, top_p, seed,
        stop, messages, ...), or pass a ready GenerateRequest as `request`. `timeout` is the deadline of the whole
        call, retries included; `request_id` (x-request-id) defaults to a fresh one, the same for every retry."""
        req = self._base._request(prompt, request, params)
        prepared = self._base._prepare(timeout, request_id, metadata)
        return GenerateStream(self._stub, req, prepared, retry or self._base.retry, self._base.wait_for_ready)

    def generate_text(
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
        with self.generate(prompt, request=request, timeout=timeout, request_id=request_id, metadata=metadata,
                           retry=retry, **params) as stream:
            return stream.collect()

    def tokenize(
        self, text: str, *, truncate_to: int = 0, return_tokens: bool = False, return_offsets: bool = False,
        timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = (),
    ) -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, truncate_to=truncate_to, return_tokens=return_tokens,
                                     return_offsets=return_offsets)
        response = self._unary(self._stub.Tokenize, request, timeout, request_id, metadata, self._base.retry)
        return TokenizeResult.from_proto(response)

    def model_info(
        self, *, timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = ()
    ) -> ModelInfo:
        response = self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, request_id, metadata,
                               self._base.retry)
        return ModelInfo.from_proto(response)

    def health(self, service: str = "", *, timeout: float | None = None, retry: RetryPolicy | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING (loading, draining) or SERVICE_UNKNOWN. A probe:
        not retried unless `retry` says so."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, None, (),
                               retry or RetryPolicy.disabled())
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, request_id: str | None,
        metadata: MetadataLike, retry: RetryPolicy,
    ) -> Any:
        """A unary call, retried where safe: these methods have no side effects, so any attempt may be repeated."""
        prepared = self._base._prepare(timeout, request_id, metadata)
        attempts = 0
        while True:
            attempts += 1
            try:
                return method(request, timeout=prepared.deadline.remaining(), metadata=prepared.metadata,
                              wait_for_ready=self._base.wait_for_ready)
            except grpc.RpcError as rpc_error:
                error = TokenstreamError.from_rpc_error(rpc_error, request_id=prepared.request_id, attempts=attempts)
                delay = retry.delay_for(error, attempts, received_response=False)
                if delay is None or not prepared.deadline.allows(delay):
                    raise error from None
            time.sleep(delay)
