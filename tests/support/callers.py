"""Several callers against one real server: their bearer tokens, and a stream read to its end on its own thread."""

from __future__ import annotations

import threading

import grpc

from tokenstream.v1 import generation_pb2 as pb

TOKENS = "token-a,token-b"  # the server's --auth-tokens: callers "a" and "b"


def as_caller(name: str) -> list[tuple[str, str]]:
    """The call metadata of caller `name` (one of TOKENS): each token is its own caller for fairness and caps."""
    return [("authorization", f"Bearer token-{name}")]


class Reader:
    """Reads one stream to its end on a thread; records the messages or the error status."""

    def __init__(self, call: grpc.Call) -> None:
        self.msgs: list[pb.GenerateResponse] = []
        self.code = grpc.StatusCode.OK
        self.error: grpc.RpcError | None = None
        self._thread = threading.Thread(target=self._read, args=(call,), daemon=True)
        self._thread.start()

    def _read(self, call: grpc.Call) -> None:
        try:
            self.msgs.extend(call)  # type: ignore[arg-type]
        except grpc.RpcError as err:
            self.code, self.error = err.code(), err

    def join(self) -> Reader:
        self._thread.join(120)
        assert not self._thread.is_alive(), "the stream did not end within 120 s"
        return self
