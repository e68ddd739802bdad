"""Helpers for tests of the HTTP front: its URL, SSE parsing, and a raw connection whose end the test controls."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable, Iterator
from typing import Any

from tests.support.servers import ServerThread

DONE = "[DONE]"


def base_url(server: ServerThread, scheme: str = "http") -> str:
    assert server.running.http_port, "the server was started without http_port"
    return f"{scheme}://127.0.0.1:{server.running.http_port}"


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
