"""Who is calling, for fair sharing and per-caller limits, the same way on every front.

The caller is its bearer token when auth is on; else the value of a configured metadata key / header that a
trusted gateway sets; else its peer address. Tokens are never kept or logged: only a short digest of them.
The caller's *class* (for metrics) comes from a bounded, configured set, so no label grows without bound.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from service.config import Config

DEFAULT_CLASS = "default"


@dataclass(frozen=True)
class Caller:
    id: str  # "token:<digest>", "key:<value>" or "ip:<address>"
    cls: str  # one of config.caller_classes, or DEFAULT_CLASS


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def peer_ip(peer: str) -> str:
    """The address of a gRPC peer string ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000") or a plain host."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer or "unknown"
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def identify(config: Config, headers: Mapping[str, str], peer_address: str, authenticated_token: str | None) -> Caller:
    """`headers` are the call's metadata or HTTP headers with lower-case names."""
    if authenticated_token:
        caller = f"token:{_digest(authenticated_token)}"
    elif config.caller_key and headers.get(config.caller_key):
        caller = f"key:{headers[config.caller_key][:128]}"
    else:
        caller = f"ip:{peer_address}"
    classes = [c for c in config.caller_classes.split(",") if c]
    wanted = headers.get(config.caller_class_key, "") if config.caller_class_key else ""
    return Caller(caller, wanted if wanted in classes else DEFAULT_CLASS)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
