"""What Client and AsyncClient share: settings, per-call preparation, and the state machine of a call's attempts.

Every decision lives here (deadline, retry or raise, error mapping, "once a message arrived nothing is retried",
result building); client.py and aio.py only do the I/O around it: start an attempt, read it, wait out a backoff.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar, Unpack, cast

import grpc
from grpc_health.v1 import health_pb2_grpc

from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc
from tokenstream_client.channel import (
    ChannelOptions,
    Deadline,
    Metadata,
    MetadataLike,
    TLSConfig,
    call_metadata,
    channel_options,
    new_request_id,
    normalize_metadata,
    resolve_tls,
)
from tokenstream_client.errors import TokenstreamError, deadline_exceeded, no_final_message
from tokenstream_client.messages import Delta, GenerationResult, ResultBuilder
from tokenstream_client.request import GenerateParams, build_generate_request
from tokenstream_client.retry import DEFAULT_RETRY, RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class PreparedCall:
    request_id: str
    metadata: Metadata
    deadline: Deadline


class Attempts:
    """The attempts of one call, every one under the same deadline, request id and metadata."""

    def __init__(self, prepared: PreparedCall, retry: RetryPolicy, wait_for_ready: bool | None) -> None:
        self.prepared = prepared
        self.retry = retry
        self.wait_for_ready = wait_for_ready
        self.count = 0
        self.received = False  # once any message arrived, nothing is retried

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    def next(self) -> dict[str, Any]:
        """The stub call's keyword arguments for the next attempt; DEADLINE_EXCEEDED when no time is left for it."""
        deadline = self.prepared.deadline
        if deadline.expired():
            raise deadline_exceeded(self.request_id, self.count)
        self.count += 1
        return {"timeout": deadline.remaining(), "metadata": self.prepared.metadata,
                "wait_for_ready": self.wait_for_ready}

    def backoff(self, rpc_error: grpc.RpcError) -> float:
        """Seconds to wait before the next attempt; raises the call's TokenstreamError when none may follow."""
        error = TokenstreamError.from_rpc_error(rpc_error, request_id=self.request_id, attempts=self.count)
        delay = self.retry.delay_for(error, self.count, received_response=self.received)
        if delay is None or not self.prepared.deadline.allows(delay):
            raise error from None
        return delay


class Wake(Protocol):
    """threading.Event for Client, asyncio.Event for AsyncClient: set by cancel() to cut a backoff short."""

    def set(self) -> None: ...


class StreamCall(Attempts):
    """The state of one Generate call. A stream object and its generator share it, so that the generator holds no
    reference to the stream: dropping the last reference to the stream then finalises it at once, cancelling the
    call."""

    def __init__(self, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy,
                 wait_for_ready: bool | None, wake: Wake) -> None:
        super().__init__(prepared, retry, wait_for_ready)
        self.request = request
        self.wake = wake
        self.cancelled = False
        self.call: Any = None  # the attempt in flight: a grpc or grpc.aio call
        self.builder = ResultBuilder()

    def cancel(self) -> None:
        self.cancelled = True
        self.wake.set()
        call = self.call
        if call is not None:
            call.cancel()

    def open(self, stub: pb_grpc.GenerationServiceStub) -> Any:
        """Start the next attempt (sync and grpc.aio stubs start a call alike: neither blocks)."""
        call = stub.Generate(self.request, **self.next())
        self.call = call
        if self.cancelled:  # cancel() ran between the caller's check and now
            call.cancel()
        return call

    def close(self, call: Any) -> None:
        """The attempt ends here: closed early, finalised, failed or done (cancelling a finished call is a no-op)."""
        self.call = None
        call.cancel()

    def delta(self, message: pb.GenerateResponse) -> Delta:
        self.received = True
        delta = Delta.from_proto(message)
        self.builder.add(delta)
        return delta

    def done(self) -> None:
        """The attempt's messages ran out; INTERNAL unless the final one was among them."""
        if self.builder.final is None:
            raise no_final_message(self.request_id, self.count)

    def failed(self, rpc_error: grpc.RpcError) -> float | None:
        """The backoff before the next attempt, or None when the stream was cancelled: the iteration then ends
        quietly. Raises the call's TokenstreamError when no attempt may follow."""
        return None if self.cancelled else self.backoff(rpc_error)

    def result(self) -> GenerationResult:
        return self.builder.result(self.request_id, self.count)


class StreamBase:
    """What GenerateStream and AsyncGenerateStream share; they add the iteration."""

    def __init__(self, state: StreamCall) -> None:
        self._state = state
        self.request = state.request
        self.request_id = state.request_id

    @property
    def attempts(self) -> int:
        return self._state.count

    @property
    def final(self) -> Delta | None:
        """The final message, once it has been received."""
        return self._state.builder.final

    def result(self) -> GenerationResult:
        """The collected result; ValueError before the final message."""
        return self._state.result()

    def cancel(self) -> None:
        """Cancel the call in flight; the iteration then ends quietly. Safe from any thread (GenerateStream) or
        from another task on the same loop (AsyncGenerateStream)."""
        self._state.cancel()


class GenerateOptions(GenerateParams, total=False):
    """generate()'s keywords, for the methods that pass them on."""

    request: pb.GenerateRequest | None
    timeout: float | None
    request_id: str | None
    metadata: MetadataLike
    retry: RetryPolicy | None


ChannelT = TypeVar("ChannelT")
StreamT = TypeVar("StreamT", bound=StreamBase)


class ClientBase(ABC, Generic[ChannelT, StreamT]):
    """What Client and AsyncClient share: settings, the channel, per-call preparation and generate(). They add the
    calls that do I/O."""

    _grpc: ClassVar[Any]  # grpc or grpc.aio, whose channel constructors take the same arguments

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
        channel: ChannelT | None = None,
    ) -> None:
        """target: "host:port" or "dns:///name:port" (round-robin over its addresses). tls: True for the default
        roots, or a TLSConfig. token: sent as `authorization: Bearer <token>`. timeout: default deadline of each
        call in seconds (None: none). metadata: sent with every call. channel: use this channel instead (it is not
        closed by close())."""
        self._target = target
        self._token = token
        self._timeout = timeout
        self._retry = retry
        self._metadata: Metadata = normalize_metadata(metadata)
        self._wait_for_ready = wait_for_ready
        self._owns_channel = channel is None
        self.channel: ChannelT = channel if channel is not None else self._open_channel(resolve_tls(tls), options)
        self._stub = pb_grpc.GenerationServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def _open_channel(self, tls: TLSConfig | None, options: ChannelOptions) -> ChannelT:
        opts = channel_options(self._target, tls, options)
        if tls is not None:
            return cast(ChannelT, self._grpc.secure_channel(self._target, tls.credentials(), options=opts))
        return cast(ChannelT, self._grpc.insecure_channel(self._target, options=opts))

    @property
    def target(self) -> str:
        return self._target

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
    ) -> StreamT:
        """Stream a completion. Keywords are GenerateParams (max_new_tokens, temperature, top_k, top_p, seed,
        stop, messages, ...), or pass a ready GenerateRequest as `request`. `timeout` is the deadline of the whole
        call, retries included; `request_id` (x-request-id) defaults to a fresh one, the same for every retry."""
        req = self._request(prompt, request, params)
        return self._stream(req, self._prepare(timeout, request_id, metadata), retry or self._retry)

    @abstractmethod
    def _stream(self, request: pb.GenerateRequest, prepared: PreparedCall, retry: RetryPolicy) -> StreamT: ...

    def _prepare(self, timeout: float | None, request_id: str | None, metadata: MetadataLike) -> PreparedCall:
        """Called when the call is made, so that the caller's OpenTelemetry context is the one propagated."""
        rid = request_id or new_request_id()
        md = call_metadata(request_id=rid, token=self._token, base=self._metadata, extra=metadata)
        return PreparedCall(rid, md, Deadline(self._timeout if timeout is None else timeout))

    def _attempts(self, timeout: float | None, request_id: str | None, metadata: MetadataLike,
                  retry: RetryPolicy | None = None) -> Attempts:
        """A unary call's attempts; probes pass their own `retry`."""
        return Attempts(self._prepare(timeout, request_id, metadata), retry or self._retry, self._wait_for_ready)

    @staticmethod
    def _request(
        prompt: str | None, request: pb.GenerateRequest | None, params: GenerateParams
    ) -> pb.GenerateRequest:
        if request is not None:
            if prompt is not None or params:
                raise TypeError("pass either request= or a prompt and parameters, not both")
            return request
        return build_generate_request(prompt, **params)
