"""Reading what a gRPC call returned: token ids of a stream, and the google.rpc.Status details of an error."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tokenstream.v1 import generation_pb2 as pb


def ids_of(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [t.id for m in msgs for t in m.tokens]


@dataclass
class ErrorDetails:
    """The rich error model's details an error carried (google.rpc.Status in grpc-status-details-bin)."""

    has_status: bool = False
    retry_s: float | None = None  # RetryInfo.retry_delay
    bad_fields: dict[str, str] = field(default_factory=dict)  # BadRequest: field -> description
    quota_subjects: list[str] = field(default_factory=list)  # QuotaFailure violations' subjects
    kinds: list[str] = field(default_factory=list)  # each detail's message name, in order


def error_details(err: grpc.RpcError) -> ErrorDetails:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out = ErrorDetails(has_status=status is not None)
    for detail in status.details if status else ():
        info, bad = error_details_pb2.RetryInfo(), error_details_pb2.BadRequest()
        quota = error_details_pb2.QuotaFailure()
        if detail.Unpack(info):
            out.retry_s = info.retry_delay.ToMilliseconds() / 1000.0
            out.kinds.append("RetryInfo")
        elif detail.Unpack(bad):
            out.bad_fields.update({v.field: v.description for v in bad.field_violations})
            out.kinds.append("BadRequest")
        elif detail.Unpack(quota):
            out.quota_subjects += [v.subject for v in quota.violations]
            out.kinds.append("QuotaFailure")
    return out


def violations(err: grpc.RpcError) -> dict[str, str]:
    """BadRequest's field -> description."""
    details = error_details(err)
    assert details.has_status, "the error must carry google.rpc.Status details"
    return details.bad_fields


def bad_fields(err: grpc.RpcError) -> list[str]:
    return list(violations(err))


def retry_delay_s(err: grpc.RpcError) -> float | None:
    return error_details(err).retry_s
