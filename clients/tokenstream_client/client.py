"""The synchronous client."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Self, Unpack

import grpc
from grpc_health.v1 import health_pb2

from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc
from tokenstream_client._base import ClientBase, GenerateOptions, PreparedCall, StreamBase, StreamCall
from tokenstream_client.channel import MetadataLike
from tokenstream_client.messages import Delta, GenerationResult, ModelInfo, TokenizeResult
from tokenstream_client.retry import RetryPolicy


def _deltas(
    stub: pb_grpc.GenerationServiceStub, state: StreamCall, wake: threading.Event
) -> Generator[Delta, None, None]:
    """The I/O of a Generate call's attempts; StreamCall makes every decision."""
    while not state.cancelled:
        call = state.open(stub)
        try:
            for message in call:
                yield state.delta(message)
            state.done()
            return
        except grpc.RpcError as rpc_error:
            delay = state.failed(rpc_error)
            if delay is None:
                return
        finally:
            state.close(call)
        if wake.wait(delay):
            return  # cancelled during the backoff


class GenerateStream(StreamBase, Iterator[Delta]):
    """The deltas of one Generate call, retried where safe.

    Iterate it for Delta objects; the call starts on the first iteration. Closing it (close(), a `with` block, or
    dropping the last reference) cancels the call, and the server stops decoding for it. cancel() may be called
    from another thread; the iteration then ends quietly.
    """

    def __init__(
        self, stub: pb_grpc.GenerationServiceStub, request: pb.GenerateRequest, prepared: PreparedCall,
        retry: RetryPolicy, wait_for_ready: bool | None,
    ) -> None:
        wake = threading.Event()
        super().__init__(StreamCall(request, prepared, retry, wait_for_ready, wake))
        self._gen = _deltas(stub, self._state, wake)

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Delta:
        return next(self._gen)

    def collect(self) -> GenerationResult:
        """Read the rest of the stream; the result covers every delta, including those already iterated."""
        for _ in self:
            pass
        return self.result()

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


class Client(ClientBase[grpc.Channel, GenerateStream]):
    """A synchronous client for tokenstream.v1.GenerationService.

    >>> with Client("127.0.0.1:50051") as client:
    ...     for delta in client.generate("Hello", max_new_tokens=16):
    ...         print(delta.text, end="", flush=True)
    """

    _grpc = grpc

    def _stream(self, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy) -> GenerateStream:
        return GenerateStream(self._stub, request, prepared, retry, self._wait_for_ready)

    def close(self) -> None:
        if self._owns_channel:
            self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def generate_text(
        self, prompt: str | None = None, **kwargs: Unpack[GenerateOptions]
    ) -> GenerationResult:
        """Generate and collect: the full text, token ids, usage and finish reason. Takes generate()'s arguments."""
        with self.generate(prompt, **kwargs) as stream:
            return stream.collect()

    def tokenize(
        self, text: str, *, truncate_to: int = 0, return_tokens: bool = False, return_offsets: bool = False,
        timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = (),
    ) -> TokenizeResult:
        request = pb.TokenizeRequest(text=text, truncate_to=truncate_to, return_tokens=return_tokens,
                                     return_offsets=return_offsets)
        return TokenizeResult.from_proto(self._unary(self._stub.Tokenize, request, timeout, request_id, metadata))

    def model_info(
        self, *, timeout: float | None = None, request_id: str | None = None, metadata: MetadataLike = ()
    ) -> ModelInfo:
        return ModelInfo.from_proto(
            self._unary(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout, request_id, metadata))

    def health(self, service: str = "", *, timeout: float | None = None, retry: RetryPolicy | None = None) -> str:
        """The grpc.health.v1 status name: SERVING, NOT_SERVING (loading, draining) or SERVICE_UNKNOWN. A probe:
        not retried unless `retry` says so."""
        response = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, None, (),
                               retry or RetryPolicy.disabled())
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _unary(
        self, method: Callable[..., Any], request: Any, timeout: float | None, request_id: str | None,
        metadata: MetadataLike, retry: RetryPolicy | None = None,
    ) -> Any:
        """A unary call, retried where safe: these methods have no side effects, so any attempt may be repeated."""
        attempts = self._attempts(timeout, request_id, metadata, retry)
        while True:
            try:
                return method(request, **attempts.next())
            except grpc.RpcError as rpc_error:
                delay = attempts.backoff(rpc_error)
            time.sleep(delay)
