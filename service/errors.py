"""Every error the service returns is mapped to a gRPC status here, and only here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from service.engine.api import CallerQuotaError, QueueFullError
from service.engine.tokenizer import ChatTemplateError


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request field's path, e.g. "sampling.top_p"
    description: str


class InvalidRequestError(ValueError):
    def __init__(self, violations: Sequence[FieldViolation]) -> None:
        self.violations = tuple(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


class NotReadyError(RuntimeError):
    """The model is still loading or warming up."""


class ShuttingDownError(RuntimeError):
    """The server is draining after SIGTERM and admits no new streams."""


class EngineOutOfMemoryError(RuntimeError):
    """The engine ran out of memory for this request before its first token."""


class DeadlineTooShortError(RuntimeError):
    """The caller's deadline is shorter than the estimated wait plus prefill."""


class UnauthenticatedError(RuntimeError):
    """A bearer token is required and was missing or wrong."""


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(int(seconds * 1000))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(exc: BaseException) -> grpc.Status:
    """The status for an exception. Unknown exceptions become INTERNAL with their type only."""
    details: list = []
    if isinstance(exc, InvalidRequestError):
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
    elif isinstance(exc, EngineOutOfMemoryError):
        code, message = code_pb2.RESOURCE_EXHAUSTED, f"out of memory: {exc}"
        details.append(_retry_info(2.0))
    elif isinstance(exc, DeadlineTooShortError):
        code, message = code_pb2.DEADLINE_EXCEEDED, str(exc)
    elif isinstance(exc, (NotReadyError, ShuttingDownError)):
        code, message = code_pb2.UNAVAILABLE, str(exc)
    elif isinstance(exc, UnauthenticatedError):
        code, message = code_pb2.UNAUTHENTICATED, str(exc)
    else:
        code, message = code_pb2.INTERNAL, f"internal error ({type(exc).__name__})"
    status = status_pb2.Status(code=code, message=message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def code_name(exc: BaseException) -> str:
    """The canonical status name of an exception (for metrics and logs on every front)."""
    return to_status(exc).code.name


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    status = to_status(exc)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: abort raises")
