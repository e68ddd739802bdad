"""Who may call: TLS or mTLS credentials, and an optional bearer-token interceptor."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from service.config import Config
from service.errors import UnauthenticatedError, to_status

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")


def server_credentials(config: Config) -> grpc.ServerCredentials | None:
    """TLS from cert/key files; with a client CA, client certificates are required (mTLS)."""
    if not (config.tls_cert or config.tls_key):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def http_tls_options(config: Config) -> dict[str, Any]:
    """The same TLS (and mTLS, with a client CA) for the HTTP front, as uvicorn's settings; {} without TLS."""
    if not (config.tls_cert or config.tls_key):
        return {}
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    options: dict[str, Any] = {"ssl_certfile": config.tls_cert, "ssl_keyfile": config.tls_key}
    if config.tls_client_ca:
        options.update(ssl_ca_certs=config.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


def load_tokens(config: Config) -> tuple[bytes, ...]:
    """Accepted bearer tokens: one per line in --auth-tokens-file, and/or comma-separated in --auth-tokens."""
    tokens: list[str] = []
    if config.auth_tokens_file:
        tokens += Path(config.auth_tokens_file).read_text().splitlines()
    tokens += config.auth_tokens.split(",")
    return tuple(t.strip().encode() for t in tokens if t.strip())


def authorized(tokens: Sequence[bytes], authorization: str | Sequence[str]) -> bool:
    """Whether a call's `authorization` is `Bearer <one of the tokens>` (every front). Given all of a call's
    `authorization` entries, exactly one is accepted: a second could name another caller than the one checked."""
    if not isinstance(authorization, str):
        if len(authorization) != 1:
            return False
        authorization = authorization[0]
    scheme, _, presented = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    candidate = presented.strip().encode()
    # Compare against every token, always, in constant time: no early exit that leaks which one matched.
    matches = [hmac.compare_digest(candidate, token) for token in tokens]
    return any(matches)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED unless the call's one `authorization: Bearer <token>` matches; health stays open for probes."""

    def __init__(self, tokens: Sequence[bytes], protect_reflection: bool) -> None:
        self._tokens = tuple(tokens)
        self._open_prefixes = (HEALTH_PREFIX,) + (() if protect_reflection else REFLECTION_PREFIXES)

    def _authorized(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        values = [v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                  for k, v in metadata or () if k == "authorization"]
        return authorized(self._tokens, values)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._open_prefixes):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    status = to_status(UnauthenticatedError("missing or invalid bearer token"))

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(status.code, status.details, status.trailing_metadata)
        yield  # an async generator, like the method it replaces

    kw = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kw)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kw)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kw)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kw)
