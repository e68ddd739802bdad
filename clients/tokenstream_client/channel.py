"""Channel set-up shared by Client and AsyncClient: options for long-lived streams, TLS, per-call metadata."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import propagate

from tokenstream_client import __version__

# Keepalive pings every 30 s (the server accepts them down to every 10 s, even without calls), so that a stream
# idle behind a NAT or a load balancer stays open and a dead peer is noticed within 10 s.
KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)

# For dns:/// targets: spread calls over every address the name resolves to, instead of pick_first.
ROUND_ROBIN_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

ChannelOptions = Sequence[tuple[str, Any]]
MetadataValue = str | bytes  # bytes for keys ending in -bin
MetadataLike = Mapping[str, MetadataValue] | Iterable[tuple[str, MetadataValue]]
Metadata = tuple[tuple[str, MetadataValue], ...]


@dataclass(frozen=True)
class TLSConfig:
    """TLS for the channel. Leave root_certificates unset to trust gRPC's default roots; set both
    certificate_chain and private_key for mutual TLS."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # verify the server as this name instead of the target's host (testing)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key, and the other way round")

    @classmethod
    def from_files(
        cls, ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLSConfig:
        def read(path: str | Path | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


def channel_options(target: str, tls: TLSConfig | None = None, extra: ChannelOptions = ()) -> list[tuple[str, Any]]:
    """The options the SDK opens a channel with; `extra` overrides any of them by name."""
    options: dict[str, Any] = dict(KEEPALIVE_OPTIONS)
    options["grpc.primary_user_agent"] = f"tokenstream-client-python/{__version__}"
    if target.startswith("dns:"):
        options["grpc.service_config"] = ROUND_ROBIN_SERVICE_CONFIG
    if tls is not None and tls.server_name:
        options["grpc.ssl_target_name_override"] = tls.server_name
    options.update(dict(extra))
    return list(options.items())


def resolve_tls(tls: TLSConfig | bool | None) -> TLSConfig | None:
    if tls is True:
        return TLSConfig()
    if tls is False or tls is None:
        return None
    return tls


def new_request_id() -> str:
    return uuid.uuid4().hex


def call_metadata(
    *, request_id: str, token: str | None, base: MetadataLike = (), extra: MetadataLike = ()
) -> Metadata:
    """x-request-id, authorization, the current OpenTelemetry context (W3C traceparent) and any extra metadata.

    One `authorization` entry at most (a server refuses a call with two): an `authorization` in the call's own
    metadata wins over one in the client's metadata, which wins over `token`."""
    pairs: list[tuple[str, MetadataValue]] = [("x-request-id", request_id)]
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # traceparent, tracestate, baggage: whatever the global propagator writes
    pairs.extend((key.lower(), value) for key, value in carrier.items())
    given = (*normalize_metadata(base), *normalize_metadata(extra))
    authorization = [value for key, value in given if key == "authorization"]
    if authorization:
        pairs.append(("authorization", authorization[-1]))
    elif token:
        pairs.append(("authorization", f"Bearer {token}"))
    return (*pairs, *((key, value) for key, value in given if key != "authorization"))


def normalize_metadata(metadata: MetadataLike) -> Metadata:
    """Pairs with lower-case keys (gRPC requires them) and str values, bytes kept for -bin keys."""
    items = metadata.items() if isinstance(metadata, Mapping) else metadata
    return tuple((str(key).lower(), value if isinstance(value, bytes) else str(value)) for key, value in items)


class Deadline:
    """An absolute deadline on the monotonic clock, shared by every attempt of a call."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - time.monotonic()

    def expired(self) -> bool:
        left = self.remaining()
        return left is not None and left <= 0

    def allows(self, delay: float) -> bool:
        """Whether waiting `delay` seconds still leaves time for another attempt."""
        left = self.remaining()
        return left is None or delay < left
