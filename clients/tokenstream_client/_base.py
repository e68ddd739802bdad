"""What Client and AsyncClient share: per-client settings and per-call preparation."""

from __future__ import annotations

from dataclasses import dataclass

from tokenstream.v1 import generation_pb2 as pb
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
from tokenstream_client.request import GenerateParams, build_generate_request
from tokenstream_client.retry import RetryPolicy

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class PreparedCall:
    request_id: str
    metadata: Metadata
    deadline: Deadline


class ClientBase:
    def __init__(
        self,
        target: str,
        *,
        tls: TLSConfig | bool | None,
        token: str | None,
        timeout: float | None,
        retry: RetryPolicy,
        metadata: MetadataLike,
        options: ChannelOptions,
        wait_for_ready: bool | None,
    ) -> None:
        self.target = target
        self.tls = resolve_tls(tls)
        self.token = token
        self.timeout = timeout
        self.retry = retry
        self.metadata: Metadata = normalize_metadata(metadata)
        self.options = channel_options(target, self.tls, options)
        self.wait_for_ready = wait_for_ready

    def _prepare(self, timeout: float | None, request_id: str | None, metadata: MetadataLike) -> PreparedCall:
        """Called when the call is made, so that the caller's OpenTelemetry context is the one propagated."""
        rid = request_id or new_request_id()
        md = call_metadata(request_id=rid, token=self.token, base=self.metadata, extra=metadata)
        return PreparedCall(rid, md, Deadline(self.timeout if timeout is None else timeout))

    @staticmethod
    def _request(
        prompt: str | None, request: pb.GenerateRequest | None, params: GenerateParams
    ) -> pb.GenerateRequest:
        if request is not None:
            if prompt is not None or params:
                raise TypeError("pass either request= or a prompt and parameters, not both")
            return request
        return build_generate_request(prompt, **params)
