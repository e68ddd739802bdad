"""What a front knows about one call besides its request: read from its headers or metadata the same way on both."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.admission import SLO_HEADERS
from service.callers import OBJECTIVE, Caller, bearer_token, identify, peer_ip, vouched
from service.engine.api import ModelInfo
from service.state import ServerState
from service.validation import Sampling

REQUEST_ID = "x-request-id"
# A caller's request id goes into logs, spans and response headers: short, visible ASCII only.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class Front:
    """A front's name (metrics, logs) and how its spans spell a call's status."""

    name: str  # "grpc" or "http"
    status_attribute: str  # e.g. "rpc.grpc.status_code"
    status_value: Callable[[str], int]  # the canonical status name ("OK", ...) as that attribute's value
    # What unset sampling parameters mean on this front, given the served model (applied by the lifecycle):
    # gRPC's contract says greedy; OpenAI clients expect the model's recommendation, else temperature 1.
    sampling_defaults: Callable[[ModelInfo], Sampling]


@dataclass(frozen=True)
class CallInfo:
    """What a front knows about one call besides its request message."""

    request_id: str
    remaining_s: float | None  # until the caller's own deadline, if it set one
    front: Front
    caller: Caller  # who is calling (service/callers.py): fair sharing and per-caller limits
    span_name: str  # e.g. "/tokenstream.v1.GenerationService/Generate" or "POST /v1/chat/completions"
    carrier: Mapping[str, str] = field(default_factory=dict)  # headers or metadata, for `traceparent`
    span_attributes: dict[str, str | int] = field(default_factory=dict)  # the front's own (rpc.*, http.*)
    priority: int = 0  # of the gateway's objective (x-gateway-inference-objective, from a trusted proxy)
    # The request's latency targets as the gateway sends them (x-llm-d-slo-ttft-ms, -tpot-ms), checked by the
    # lifecycle: a target this server cannot meet now refuses the request before it queues.
    slo_headers: dict[str, str] = field(default_factory=dict)


def read_call(state: ServerState, headers: Mapping[str, str], peer: str, front: Front, span_name: str,
              span_attributes: dict[str, str | int], remaining_s: float | None = None) -> CallInfo:
    """`headers` are the call's metadata or HTTP headers with lower-case names. A missing or malformed request id
    is replaced by a fresh one, on both fronts: whatever a caller sends never reaches logs and spans unchecked."""
    given = headers.get(REQUEST_ID, "")
    # The caller is the value that was authenticated (a call with more than one `authorization` never gets here).
    token = bearer_token(headers) if state.auth_on else None
    naming, client = vouched(state.config, headers, peer)
    return CallInfo(request_id=given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex, remaining_s=remaining_s,
                    front=front, caller=identify(state.config, naming, client, token), span_name=span_name,
                    carrier=headers, span_attributes=span_attributes,
                    priority=state.config.priorities.get(naming.get(OBJECTIVE, ""), 0),
                    slo_headers={k: headers[k] for k in SLO_HEADERS if k in headers})


def read_grpc_call(state: ServerState, context: Any, front: Front, service: str, method: str) -> CallInfo:
    """read_call for a gRPC method of `service` (its full name): the metadata, the peer, the caller's deadline."""
    attributes: dict[str, str | int] = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    return read_call(state, metadata_headers(context.invocation_metadata() or ()), peer_ip(context.peer() or ""),
                     front, f"/{service}/{method}", attributes, remaining_s=context.time_remaining())


def with_request_id(call: CallInfo, given: str) -> CallInfo:
    """The call under the request id its message names (vLLM's GenerateRequest.request_id, which Abort refers to),
    held to the same rule as the header's: a malformed one is ignored."""
    return dataclasses.replace(call, request_id=given) if _REQUEST_ID.fullmatch(given) else call


def metadata_headers(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """gRPC metadata as headers: the text entries, each key's first value, as the auth check and HTTP read them."""
    headers: dict[str, str] = {}
    for key, value in metadata:
        if isinstance(value, str):
            headers.setdefault(key, value)
    return headers
