"""What every gRPC contract served here shares: requests that fail to decode reach the servicer (and get
INVALID_ARGUMENT naming the problem, instead of gRPC's generic deserialization failure), and a service's handlers
are registered from its descriptor."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf import message as protobuf

from service.errors import FieldViolation, InvalidRequestError


class Undecodable:
    """Stands in for request bytes that are not a valid message (bad wire format, or invalid UTF-8 in a string)."""

    def __init__(self, error: str) -> None:
        self.error = error


def decoding(parse: Callable[[bytes], protobuf.Message]) -> Callable[[bytes], protobuf.Message | Undecodable]:
    def deserialize(data: bytes) -> protobuf.Message | Undecodable:
        try:
            return parse(data)
        except protobuf.DecodeError as exc:
            return Undecodable(str(exc))

    return deserialize


def require_decoded(req: object) -> None:
    if isinstance(req, Undecodable):
        raise InvalidRequestError([FieldViolation("request", f"not a valid message: {req.error}")])


def register(server: grpc.aio.Server, service: descriptor.ServiceDescriptor,
             methods: Mapping[str, Callable[..., Any]]) -> None:
    """Serve `service`: each of its methods with the callable of that name in `methods`, every request decoded
    tolerantly (the message classes are the generated ones, found from the descriptors)."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        if method.client_streaming:
            raise TypeError(f"{method.full_name}: client streaming is not served")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(methods[method.name], request_deserializer=decoding(request_cls.FromString),
                                     response_serializer=response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)

