"""Who is calling, for fair sharing and per-caller limits, the same way on every front.

The caller is its bearer token when auth is on; else the value of a configured metadata key / header that a
trusted proxy sets (e.g. the gateway's x-llm-d-inference-fairness-id); else its client address, IPv6 by /64.
Headers that name a client (X-Forwarded-For and the caller key) count only from a configured trusted proxy: from
anyone else they are ignored. With auth on, the caller key names a sub-caller *within* the token, which never
escapes the token's caps. Tokens are never kept or logged: only a short digest of them.
The caller's *class* (for metrics) comes from a bounded, configured set, so no label grows without bound.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from service.config import Config

DEFAULT_CLASS = "default"
FORWARDED_FOR = "x-forwarded-for"
OBJECTIVE = "x-gateway-inference-objective"  # the gateway's InferenceObjective name: a priority (Config)
IPV6_GROUP = 64  # one IPv6 client usually holds a whole /64: its addresses are one caller
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Caller:
    id: str  # "token:<digest>", "key:<value>" or "ip:<address>": the unit of caps, rates and fair shares
    cls: str  # one of config.caller_classes, or DEFAULT_CLASS
    sub: str = ""  # with auth on, "key:<value>" from a trusted proxy: a sub-caller within the token's caps


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


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as peers and X-Forwarded-For hops spell it ("10.0.0.1", "[2001:db8::1]:443", "1.2.3.4:80")."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


@functools.lru_cache(maxsize=8)
def _trusted_networks(spec: str) -> tuple[_Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _trusted(config: Config, address: str) -> bool:
    ip = _address(address)
    return ip is not None and any(ip in network for network in _trusted_networks(config.trusted_proxies))


def vouched(config: Config, headers: Mapping[str, str], peer: str) -> tuple[dict[str, str], str]:
    """The headers that may name the caller and the client's address. From a trusted proxy, the client is the
    nearest X-Forwarded-For hop that is not itself a trusted proxy; from anyone else the headers a proxy would set
    (X-Forwarded-For, the caller key) are dropped and the client is the peer."""
    if not _trusted(config, peer):
        return {k: v for k, v in headers.items() if k not in (FORWARDED_FOR, config.caller_key, OBJECTIVE)}, peer
    client = peer
    for hop in reversed(headers.get(FORWARDED_FOR, "").split(",")):
        address = _address(hop)
        if address is None:
            break  # a malformed hop: trust nothing left of it
        client = str(address)
        if not _trusted(config, client):
            break
    return dict(headers), client


def _grouped(address: str) -> str:
    """IPv6 clients by /64 (one host usually holds the whole /64); IPv4 addresses and other names as they are."""
    ip = _address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/{IPV6_GROUP}", strict=False))
    return str(ip) if ip is not None else address


def identify(config: Config, headers: Mapping[str, str], peer_address: str, authenticated_token: str | None) -> Caller:
    """`headers` are the call's metadata or HTTP headers with lower-case names, as `vouched` passes them."""
    key = headers.get(config.caller_key, "")[:128] if config.caller_key else ""
    sub = ""
    if authenticated_token:
        caller, sub = f"token:{_digest(authenticated_token)}", f"key:{key}" if key else ""
    elif key:
        caller = f"key:{key}"
    else:
        caller = f"ip:{_grouped(peer_address)}"
    classes = [c for c in config.caller_classes.split(",") if c]
    wanted = headers.get(config.caller_class_key, "") if config.caller_class_key else ""
    return Caller(caller, wanted if wanted in classes else DEFAULT_CLASS, sub)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
