"""Every error the service returns is mapped here, and only here: to a gRPC status, and from that status to an
HTTP status and OpenAI error object for the HTTP front, so the two fronts cannot disagree."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.engine.api import CallerQuotaError, ChatTemplateError, QueueFullError
from service.engine.sequence import SLOW_READER
from service.engine.types import ErrorKind


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request field's path, e.g. "sampling.top_p"
    description: str


class InvalidRequestError(ValueError):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class UnsupportedMediaTypeError(InvalidRequestError):
    """An HTTP request body that is not `application/json` (INVALID_ARGUMENT, and HTTP's own 415)."""


class NotReadyError(RuntimeError):
    """The model is still loading or warming up."""


class ShuttingDownError(RuntimeError):
    """The server is draining after SIGTERM and admits no new streams."""


class EngineOutOfMemoryError(RuntimeError):
    """The engine ran out of memory for this request before its first token."""


class DeadlineTooShortError(RuntimeError):
    """The caller's deadline is shorter than the estimated wait plus prefill."""


class TargetUnattainableError(RuntimeError):
    """A latency target the request carries (the gateway's SLO headers) that this server cannot meet now."""


class UnauthenticatedError(RuntimeError):
    """A bearer token is required and was missing or wrong."""


class ModelNotFoundError(InvalidRequestError):
    """The request names a model this server does not serve (the HTTP front's `model`)."""


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(seconds * 1000))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def rich_status(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for an exception. Unknown exceptions become INTERNAL with their type only."""
    details: list = []
    if isinstance(exc, ModelNotFoundError):
        code, message = code_pb2.NOT_FOUND, str(exc)
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]))
    elif isinstance(exc, InvalidRequestError):
        code, message = code_pb2.INVALID_ARGUMENT, str(exc)
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in exc.violations
        ]))
    elif isinstance(exc, ChatTemplateError):
        code, message = code_pb2.INVALID_ARGUMENT, f"messages: {exc}"
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field="messages", description=str(exc))
        ]))
    elif isinstance(exc, CallerQuotaError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, f"quota exceeded: {exc}; retry later"
        details.append(_retry_info(exc.retry_after_s))
        details.append(error_details_pb2.QuotaFailure(violations=[error_details_pb2.QuotaFailure.Violation(
            subject=f"caller:{exc.caller}", description=f"per-caller {exc.limit} limit: {exc}")]))
    elif isinstance(exc, QueueFullError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, f"server busy: {exc}; retry later"
        details.append(_retry_info(1.0))
    elif isinstance(exc, EngineOutOfMemoryError):  # the engine's (Paddle's) text stays in the server's log
        code, message = code_pb2.RESOURCE_EXHAUSTED, "out of memory before the first token; retry later"
        details.append(_retry_info(2.0))
    elif isinstance(exc, TargetUnattainableError):  # another replica may meet it: say when this one might
        code, message = code_pb2.RESOURCE_EXHAUSTED, str(exc)
        details.append(_retry_info(1.0))
    elif isinstance(exc, DeadlineTooShortError):
        code, message = code_pb2.DEADLINE_EXCEEDED, str(exc)
    elif isinstance(exc, (NotReadyError, ShuttingDownError)):  # loading, draining or stopped: try another replica
        code, message = code_pb2.UNAVAILABLE, str(exc)
        details.append(_retry_info(1.0))
    elif isinstance(exc, UnauthenticatedError):
        code, message = code_pb2.UNAUTHENTICATED, str(exc)
    else:
        code, message = code_pb2.INTERNAL, f"internal error ({type(exc).__name__})"
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return status


def stream_error(error: str, kind: ErrorKind | None) -> str:
    """What a caller is told of an engine error that ended its stream: the engine's own words for the endings it
    names (a slow reader, a full queue), else the kind and exception type only. An exception's text (Paddle's
    messages, paths, shapes) stays in the server's log, as for errors raised anywhere else."""
    if kind is ErrorKind.OVERLOADED or error.startswith(SLOW_READER):
        return error
    if kind is ErrorKind.OUT_OF_MEMORY:  # "out of memory in prefill: <Paddle's text>": the engine's words only
        return error.partition(": ")[0] or "out of memory"
    name = error.partition(":")[0]
    return f"internal error ({name})" if name.isidentifier() else "internal error"


def to_status(exc: BaseException) -> grpc.Status:
    """The gRPC status for an exception, with its details (BadRequest, RetryInfo) in the trailing metadata."""
    return rpc_status.to_status(rich_status(exc))


def code_name(exc: BaseException) -> str:
    """The canonical status name of an exception (for metrics and logs on every front)."""
    return to_status(exc).code.name


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")


# --- the HTTP front: every HTTP error is derived from the exception's gRPC status above ------------------------------

# google.rpc.Code's documented HTTP mapping (CANCELLED is 499, "client closed request").
HTTP_STATUS = {
    code_pb2.INVALID_ARGUMENT: 400, code_pb2.FAILED_PRECONDITION: 400, code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNAUTHENTICATED: 401, code_pb2.PERMISSION_DENIED: 403, code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409, code_pb2.ABORTED: 409, code_pb2.RESOURCE_EXHAUSTED: 429, code_pb2.CANCELLED: 499,
    code_pb2.UNIMPLEMENTED: 501, code_pb2.UNAVAILABLE: 503, code_pb2.DEADLINE_EXCEEDED: 504,
}
# The OpenAI error object's `type` for each HTTP status; anything else is a server_error.
OPENAI_ERROR_TYPE = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    409: "conflict_error", 415: "invalid_request_error",
    429: "rate_limit_error", 503: "service_unavailable_error", 504: "timeout_error",
}


def http_status(code: str) -> int:
    """The HTTP status for a canonical status name ("OK", "INVALID_ARGUMENT", ...)."""
    value = code_pb2.Code.Value(code)
    return 200 if value == code_pb2.OK else HTTP_STATUS.get(value, 500)


@dataclass(frozen=True)
class HttpError:
    """An HTTP error response: status, OpenAI error object and headers (Retry-After from the same RetryInfo)."""

    status: int
    body: dict[str, dict[str, str | None]]
    headers: dict[str, str]


def to_http(exc: BaseException, spell: Callable[[str], str | None] = lambda field: field) -> HttpError:
    """The HTTP error for an exception. `spell` writes a violated field the way the HTTP API spells it
    ("stopping.stop_sequences[1]" -> "stop[1]"); the OpenAI object's `param` is the first one's top-level
    parameter ("messages[0].role" -> "messages"), and the message names every violation."""
    status = rich_status(exc)
    code = code_pb2.Code.Name(status.code)
    http_status = 415 if isinstance(exc, UnsupportedMediaTypeError) else HTTP_STATUS.get(status.code, 500)
    params: list[str | None] = []
    descriptions: list[str] = []
    headers: dict[str, str] = {}
    for detail in status.details:
        bad, retry = error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Unpack(bad):
            for v in bad.field_violations:
                spelled = spell(v.field)
                params.append(spelled.split("[", 1)[0] if spelled else None)
                descriptions.append(f"{spelled}: {v.description}" if spelled else v.description)
        elif detail.Unpack(retry):
            seconds = retry.retry_delay.ToMilliseconds() / 1000.0
            headers["Retry-After"] = str(max(1, math.ceil(seconds)))  # whole seconds, as RFC 9110 has it
            headers["retry-after-ms"] = str(retry.retry_delay.ToMilliseconds())  # the OpenAI SDKs read this too
    if status.code == code_pb2.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    message = "; ".join(descriptions) if descriptions else status.message
    error: dict[str, str | None] = {
        "message": message, "type": OPENAI_ERROR_TYPE.get(http_status, "server_error"),
        "param": params[0] if params else None, "code": code.lower(),
    }
    return HttpError(http_status, {"error": error}, headers)
