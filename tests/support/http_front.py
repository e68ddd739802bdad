"""Helpers for tests of the HTTP front: its URL and clients, the same request on gRPC, SSE parsing, the server's end of
a connection, and a raw connection whose end the test controls."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import openai

from tests.support.servers import ServerThread
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

DONE = "[DONE]"


def base_url(server: ServerThread, scheme: str = "http") -> str:
    assert server.running.http_port, "the server was started without http_port"
    return f"{scheme}://127.0.0.1:{server.running.http_port}"


def client(server: ServerThread, **kwargs: Any) -> openai.OpenAI:
    kwargs.setdefault("api_key", "unused")
    return openai.OpenAI(base_url=base_url(server) + "/v1", max_retries=0, timeout=60, **kwargs)


def model_name(server: ServerThread) -> str:
    return server.engine.info.name


def grpc_messages(server: ServerThread, request: pb.GenerateRequest) -> list[pb.GenerateResponse]:
    """The same request on the gRPC front, for comparing both fronts: every message of its stream."""
    with server.channel() as ch:
        return list(pb_grpc.GenerationServiceStub(ch).Generate(request, timeout=120))


def grpc_text(server: ServerThread, request: pb.GenerateRequest) -> tuple[str, pb.GenerateResponse]:
    msgs = grpc_messages(server, request)
    return "".join(m.text for m in msgs), msgs[-1]


async def _accepted_nodelay(server: ServerThread, client_port: int) -> int:
    assert server.running.http is not None
    for conn in server.running.http.server.server_state.connections:  # uvicorn's protocol, one per connection
        if conn.client is not None and conn.client[1] == client_port:
            return int(conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    raise AssertionError(f"no accepted connection from port {client_port}")


def accepted_nodelay(server: ServerThread, sock: socket.socket) -> int:
    """TCP_NODELAY on the server's end of this client socket's connection (the accepted socket), read on the
    server's loop."""
    return int(server.call(_accepted_nodelay(server, sock.getsockname()[1])))


def sse_payloads(lines: Iterable[str]) -> Iterator[Any]:
    """Each `data:` payload of an SSE stream: parsed JSON, or DONE. Anything else in the stream fails the test."""
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        data = line[len("data: "):]
        yield DONE if data == DONE else json.loads(data)


class RawCall:
    """One request on its own connection (http.client), so a test decides exactly when the client goes away."""

    def __init__(self, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None,
                 receive_buffer: int = 0) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        if receive_buffer:  # a small TCP window, as a client that reads slowly would advertise
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
            sock.settimeout(60)
            sock.connect(("127.0.0.1", port))
            self.conn.sock = sock
        self.conn.request("POST", path, json.dumps(body).encode(),
                          {"content-type": "application/json", **(headers or {})})
        self._response: http.client.HTTPResponse | None = None

    @property
    def response(self) -> http.client.HTTPResponse:
        if self._response is None:
            self._response = self.conn.getresponse()
        return self._response

    def payloads(self) -> Iterator[Any]:
        """The SSE payloads as they arrive (one readline at a time: no read-ahead past what the test asked for)."""

        def lines() -> Iterator[str]:
            while raw := self.response.readline():
                yield raw.decode("utf-8").rstrip("\r\n")

        return sse_payloads(lines())

    def json(self) -> Any:
        return json.loads(self.response.read())

    def close(self) -> None:
        """Leave: close the socket, whatever the server is doing."""
        if self._response is not None:
            self._response.close()
        self.conn.close()
