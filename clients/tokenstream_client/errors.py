"""TokenstreamError: a failed call, with the rich status details the server sends (google.rpc)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    field: str  # the request field's path, e.g. "sampling.top_p"
    description: str


class TokenstreamError(Exception):
    """A call that ended with a non-OK gRPC status, after any retries."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field_violations: Sequence[FieldViolation] = (),
        retry_delay: float | None = None,
        request_id: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.code = code
        self.message = message
        self.field_violations = tuple(field_violations)
        self.retry_delay = retry_delay  # seconds, from google.rpc.RetryInfo
        self.request_id = request_id
        self.attempts = attempts
        super().__init__(self.describe())

    @property
    def code_name(self) -> str:
        return str(self.code.name)

    def describe(self) -> str:
        """`CODE: message`, then one indented line per field violation."""
        lines = [f"{self.code_name}: {self.message}"]
        lines.extend(f"  {v.field}: {v.description}" for v in self.field_violations)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code_name,
            "message": self.message,
            "field_violations": [{"field": v.field, "description": v.description} for v in self.field_violations],
            "retry_delay_s": self.retry_delay,
            "request_id": self.request_id,
            "attempts": self.attempts,
        }

    @classmethod
    def from_rpc_error(
        cls, err: grpc.RpcError, *, request_id: str | None = None, attempts: int = 1
    ) -> TokenstreamError:
        """Works for both grpc (sync) and grpc.aio errors: both offer code(), details() and trailing_metadata()."""
        code = _call(err, "code") or grpc.StatusCode.UNKNOWN
        message = _call(err, "details") or ""
        violations: list[FieldViolation] = []
        retry_delay: float | None = None
        try:
            status = rpc_status.from_call(err)
        except (ValueError, TypeError, AttributeError):  # inconsistent or unparsable details: keep code and message
            status = None
        for detail in status.details if status is not None else ():
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                retry_delay = info.retry_delay.ToTimedelta().total_seconds()
        return cls(code, message, field_violations=violations, retry_delay=retry_delay, request_id=request_id,
                   attempts=attempts)


def _call(err: grpc.RpcError, name: str) -> Any:
    method = getattr(err, name, None)
    return method() if callable(method) else None


def deadline_exceeded(request_id: str | None, attempts: int) -> TokenstreamError:
    when = "could be retried" if attempts else "started"
    return TokenstreamError(grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded before the call {when}",
                            request_id=request_id, attempts=attempts)


def no_final_message(request_id: str | None, attempts: int) -> TokenstreamError:
    return TokenstreamError(grpc.StatusCode.INTERNAL, "the stream ended without a final message",
                            request_id=request_id, attempts=attempts)
