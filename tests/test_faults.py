"""Engine faults on the real Paddle engine behind a real server, on both fronts (issue #27).

tests/test_transport.py checks each front's mapping against a fake engine; here the real engine meets the fault,
injected through its test seams (tests/support/hooks.py's StepGate), and what a caller receives is checked against
the README and the proto:
- "An engine failure says its kind and exception type only; the exception's text stays in the server's log."
- FINISH_REASON_ERROR: "The engine failed for this request ... error_message says why. Other streams are unharmed."
- "overload gets RESOURCE_EXHAUSTED with google.rpc.RetryInfo" (HTTP: 429 with Retry-After), a request displaced from
  a full queue included, while "a stream that sent tokens is never displaced".

The real engine never raises from a stream (AsyncStream only yields chunks): a failure after tokens is the stream's
final message (FINISH_REASON_ERROR), and a refusal at submit a status before any message.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.config import Config
from tests.support.callers import TOKENS, Reader, as_caller
from tests.support.hooks import FAULT_TEXT, StepGate
from tests.support.http_front import DONE, RawCall
from tests.support.rpc import error_details, ids_of
from tests.support.servers import ServerThread, base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

SENT = 3  # tokens a stream has sent when its fault strikes
FRONTS = ["grpc", "sse", "json"]  # gRPC, HTTP streamed, HTTP whole


@pytest.fixture(scope="module")
def gated_config(model_dir: Path) -> Config:
    """conftest's gated server with the HTTP front too (conftest's `gated_server`, `gate` and `gated_stub`)."""
    return base_config(model_dir, http_port=-1)


def request(prompt: str, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n))


def internal(kind: str) -> str:
    """What errors.stream_error tells a caller of an engine exception: its type, never its text."""
    return f"internal error ({kind})"


@dataclass
class Ending:
    """How a stream that the engine failed ended, as its caller saw it."""

    # Tokens received before the error (None: a whole HTTP response carries none). gRPC's final message carries any
    # whose text was held back; an SSE error event does not, so these prompts' first tokens are whole characters.
    tokens: int | None
    message: str  # the error's message
    received: str  # everything the caller received, to search for the exception's text


class Call:
    """One generation request on one front, started at once and read to its end by end()."""

    def __init__(self, srv: ServerThread, front: str, prompt: str, request_id: str, n: int = 40) -> None:
        self.front = front
        headers = {"x-request-id": request_id}  # the id the step gate's faults are keyed by
        if front == "grpc":
            self._channel = srv.channel()
            stub = pb_grpc.GenerationServiceStub(self._channel)
            self.reader = Reader(stub.Generate(request(prompt, n), metadata=list(headers.items()), timeout=120))
        else:
            body: dict[str, Any] = {"prompt": prompt, "max_tokens": n, "temperature": 0}
            if front == "sse":
                body |= {"stream": True, "stream_options": {"continuous_usage_stats": True}}
            self.http = RawCall(srv.running.http_port, "/v1/completions", body, headers)

    def end(self) -> Ending:
        return {"grpc": self._grpc_end, "sse": self._sse_end, "json": self._json_end}[self.front]()

    def _grpc_end(self) -> Ending:
        msgs = self.reader.join().msgs
        self._channel.close()
        assert self.reader.code == grpc.StatusCode.OK  # a final message, not a status: tokens were sent
        assert msgs[-1].finish_reason == pb.FINISH_REASON_ERROR
        return Ending(len(ids_of(msgs)), msgs[-1].error_message, str(msgs))

    def _sse_end(self) -> Ending:
        payloads = list(self.http.payloads())
        self.http.close()
        assert self.http.response.status == 200
        *chunks, error, done = payloads
        assert done == DONE and all("choices" in c for c in chunks), payloads
        assert set(error) == {"error"} and error["error"]["type"] == "server_error", error
        assert error["error"]["code"] == "internal", error
        return Ending(chunks[-1]["usage"]["completion_tokens"], error["error"]["message"], json.dumps(payloads))

    def _json_end(self) -> Ending:
        body = self.http.json()
        self.http.close()
        assert self.http.response.status == 500
        assert body == {"error": {"message": body["error"]["message"], "type": "server_error", "param": None,
                                  "code": "internal"}}
        return Ending(None, body["error"]["message"], json.dumps(body))


def tokens_seen(front: str) -> int | None:
    return None if front == "json" else SENT


# -- an exception after tokens -----------------------------------------------------------------------------------


@pytest.mark.parametrize("front", FRONTS)
@pytest.mark.parametrize(("fault", "kind"), [(f"error_at_{SENT}", "RuntimeError"), (f"oom_at_{SENT}", "MemoryError")],
                         ids=["exception", "out-of-memory"])
def test_a_sequence_failing_after_tokens_ends_alone_with_its_internals_hidden(
    gated_server: ServerThread, gate: StepGate, gated_stub: Any, caplog: pytest.LogCaptureFixture, front: str,
    fault: str, kind: str,
) -> None:
    """An exception, or a MemoryError, as the engine accepts a stream's 4th token: that stream ends with its 3
    tokens and an error naming the exception's type only; its neighbour in the same batch runs to its end."""
    caplog.set_level(logging.ERROR, logger="tokenstream")
    request_id = f"{front}-{fault}"
    gate.fail(request_id, fault)
    neighbour = Reader(gated_stub.Generate(request("the neighbour", 8), timeout=120))
    failing = Call(gated_server, front, "the failing one", request_id)
    assert gated_server.engine.wait_until(lambda s: s.active == 2, 60)  # one batch from the first step
    gate.open()
    ending = failing.end()
    assert (ending.tokens, ending.message) == (tokens_seen(front), internal(kind))
    assert FAULT_TEXT not in ending.received
    assert FAULT_TEXT in caplog.text  # the exception's text is in the server's log instead
    msgs = neighbour.join().msgs
    assert (msgs[-1].finish_reason, len(ids_of(msgs))) == (pb.FINISH_REASON_MAX_TOKENS, 8)


@pytest.mark.parametrize("front", FRONTS)
def test_an_exception_escaping_the_engine_mid_stream_hides_its_internals_and_the_engine_serves_on(
    gated_server: ServerThread, gate: StepGate, gated_stub: Any, caplog: pytest.LogCaptureFixture, front: str,
) -> None:
    """An exception outside any one sequence (the iteration itself) after a stream sent 3 tokens: the engine ends
    the streams it holds with an error naming the type only, survives, and serves the next request."""
    caplog.set_level(logging.ERROR, logger="tokenstream")
    stream = Call(gated_server, front, "mid-stream", f"{front}-iteration")
    assert gated_server.engine.wait_until(lambda s: s.active == 1, 60)  # prefilled: its first token is out
    steps = gated_server.engine.stats().steps
    gate.permit(SENT - 1)
    assert gated_server.engine.wait_until(lambda s: s.steps == steps + SENT - 1, 60)
    gate.break_iteration()
    ending = stream.end()
    assert (ending.tokens, ending.message) == (tokens_seen(front), internal("RuntimeError"))
    assert FAULT_TEXT not in ending.received
    assert FAULT_TEXT in caplog.text
    gate.open()
    after = list(gated_stub.Generate(request("after the failure", 4), timeout=60))
    assert (after[-1].finish_reason, len(ids_of(after))) == (pb.FINISH_REASON_MAX_TOKENS, 4)
    assert gated_server.engine.stats().alive is True


# -- refusals at submit and displacement -------------------------------------------------------------------------


@dataclass
class Refusal:
    """What a refused request got: gRPC's status and details, or HTTP's status, headers and error object."""

    code: str
    kinds: list[str]  # the google.rpc.Status details, by name; HTTP: ["RetryInfo"] when Retry-After came
    retry_s: float | None
    subjects: list[str]  # QuotaFailure's subjects (gRPC only)


class Refused:
    """A request that the engine refuses before any message: sent at once, its refusal read by result()."""

    def __init__(self, srv: ServerThread, front: str, prompt: str, metadata: list[tuple[str, str]]) -> None:
        self.front = front
        if front == "grpc":
            self._channel = srv.channel()
            stub = pb_grpc.GenerationServiceStub(self._channel)
            self._reader = Reader(stub.Generate(request(prompt, 4), metadata=metadata, timeout=120))
        else:
            self._call = RawCall(srv.running.http_port, "/v1/completions",
                                 {"prompt": prompt, "max_tokens": 4, "stream": True}, dict(metadata))

    def result(self) -> Refusal:
        return self._grpc() if self.front == "grpc" else self._http()

    def _grpc(self) -> Refusal:
        reader = self._reader.join()
        self._channel.close()
        assert reader.msgs == [] and reader.error is not None  # a status, before any message
        details = error_details(reader.error)
        return Refusal(reader.code.name, details.kinds, details.retry_s, details.quota_subjects)

    def _http(self) -> Refusal:
        response = self._call.response
        status, retry_after, retry_ms, raw = (response.status, response.getheader("Retry-After"),
                                              response.getheader("retry-after-ms"), response.read())
        self._call.close()
        assert status == 429, raw  # a status line of its own, although the request asked for a stream
        body = json.loads(raw)
        assert (body["error"]["type"], body["error"]["code"]) == ("rate_limit_error", "resource_exhausted")
        assert retry_after is not None and retry_ms is not None and int(retry_after) == -(-int(retry_ms) // 1000)
        return Refusal("RESOURCE_EXHAUSTED", ["RetryInfo"], int(retry_ms) / 1000, [])


@pytest.mark.parametrize("front", ["grpc", "http"])
@pytest.mark.parametrize(("limits", "held", "kinds"), [
    ({"max_slots": 1, "max_queue": 1}, 2, ["RetryInfo"]),  # QueueFullError: slots and queue taken, by this caller
    ({"caller_max_streams": 1}, 1, ["RetryInfo", "QuotaFailure"]),  # CallerQuotaError: its own cap
], ids=["queue-full", "caller-cap"])
def test_an_engine_refusal_at_submit_is_its_mapped_status_before_any_message(
    model_dir: Path, front: str, limits: dict[str, int], held: int, kinds: list[str],
) -> None:
    """The real engine's submit raises; the caller gets RESOURCE_EXHAUSTED with RetryInfo (QuotaFailure for a cap;
    HTTP: 429 with Retry-After), and the engine never queued the request."""
    srv = started(base_config(model_dir, http_port=-1, **limits), hooks=StepGate(gated=True))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            holding = [stub.Generate(request(f"holds {i}", 50), timeout=120) for i in range(held)]
            assert srv.engine.wait_until(lambda s: s.active + s.waiting == held, 60)
            got = Refused(srv, front, "one too many", []).result()
            assert srv.engine.stats().waiting == held - 1  # never queued
            for call in holding:
                call.cancel()
    finally:
        srv.close()
    assert (got.code, got.retry_s) == ("RESOURCE_EXHAUSTED", 1.0)
    assert got.kinds == (kinds if front == "grpc" else ["RetryInfo"])
    assert got.subjects == (["caller:ip:127.0.0.1"] if front == "grpc" and "QuotaFailure" in kinds else [])


@pytest.mark.parametrize("front", ["grpc", "http"])
def test_a_request_displaced_from_a_full_queue_is_resource_exhausted_with_retry_info(model_dir: Path,
                                                                                    front: str) -> None:
    """One slot, one queue place, both held by caller A (its running stream has sent a token). Caller B, below its
    share, still gets in: the engine displaces A's queued request, which is refused before any message with
    RESOURCE_EXHAUSTED and RetryInfo (HTTP: 429 with Retry-After); A's running stream is untouched."""
    srv = started(base_config(model_dir, http_port=-1, max_slots=1, max_queue=1, auth_tokens=TOKENS),
                  hooks=StepGate(gated=True))
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            running = Reader(stub.Generate(request("a runs", 6), metadata=as_caller("a"), timeout=120))
            assert srv.engine.wait_until(lambda s: s.active == 1, 60)
            queued = Refused(srv, front, "a waits", as_caller("a"))
            assert srv.engine.wait_until(lambda s: s.waiting == 1, 60)
            b = Reader(stub.Generate(request("b arrives", 4), metadata=as_caller("b"), timeout=120))
            assert srv.engine.wait_until(lambda s: s.displaced == 1 and s.waiting == 1, 60)
            got = queued.result()
            srv.hooks.open()  # type: ignore[union-attr]
            a_msgs, b_msgs = running.join().msgs, b.join().msgs
    finally:
        srv.close()
    assert (got.code, got.kinds, got.retry_s) == ("RESOURCE_EXHAUSTED", ["RetryInfo"], 1.0)
    assert (a_msgs[-1].finish_reason, len(ids_of(a_msgs))) == (pb.FINISH_REASON_MAX_TOKENS, 6)
    assert b_msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS



# -- a failure while a prompt is planned for its prefill ---------------------------------------------------------


def test_a_prompt_taken_for_prefill_when_the_iteration_fails_ends_and_frees_its_callers_place(model_dir: Path) -> None:
    """The prompt has left the wait queue but holds no slot yet when its iteration fails: it must end with an error
    (not wait for its deadline), and its caller's one allowed stream must be free again for the next request."""
    gate = StepGate()
    srv = started(base_config(model_dir, caller_max_streams=1), hooks=gate)
    try:
        with srv.channel() as ch:
            stub = pb_grpc.GenerationServiceStub(ch)
            gate.fail("planned", "prefill_error")
            msgs = list(stub.Generate(request("taken, then failed", 4), timeout=120,
                                      metadata=[("x-request-id", "planned")]))
            assert (msgs[-1].finish_reason, msgs[-1].error_message) == (pb.FINISH_REASON_ERROR,
                                                                        internal("RuntimeError"))
            assert FAULT_TEXT not in msgs[-1].error_message
            after = list(stub.Generate(request("the same caller again", 4), timeout=120))
            assert (after[-1].finish_reason, len(ids_of(after))) == (pb.FINISH_REASON_MAX_TOKENS, 4)
        assert srv.engine.wait_until(lambda s: s.running == 0 and s.waiting == 0, 60)
    finally:
        srv.close()


def test_an_unexpected_exception_at_submit_is_internal_with_its_text_hidden(
    gated_server: ServerThread, gate: StepGate, gated_stub: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    """The engine's submit raises something no front maps: gRPC INTERNAL and HTTP 500, naming the exception's type
    only, before any message; the engine serves the next request."""
    caplog.set_level(logging.ERROR, logger="tokenstream")
    gate.fail("submit-grpc", "submit_error")
    gate.fail("submit-http", "submit_error")
    with pytest.raises(grpc.RpcError) as err:
        list(gated_stub.Generate(request("refused at submit", 4), timeout=120,
                                 metadata=[("x-request-id", "submit-grpc")]))
    assert (err.value.code(), err.value.details()) == (grpc.StatusCode.INTERNAL, internal("RuntimeError"))
    call = RawCall(gated_server.running.http_port, "/v1/completions",
                   {"prompt": "refused at submit", "max_tokens": 4, "stream": True}, {"x-request-id": "submit-http"})
    status, raw = call.response.status, call.response.read()
    call.close()
    assert status == 500, raw
    body = json.loads(raw)
    assert (body["error"]["type"], body["error"]["message"]) == ("server_error", internal("RuntimeError"))
    assert FAULT_TEXT not in raw.decode() and FAULT_TEXT in caplog.text
    gate.open()
    msgs = list(gated_stub.Generate(request("served next", 4), timeout=120))
    assert (msgs[-1].finish_reason, len(ids_of(msgs))) == (pb.FINISH_REASON_MAX_TOKENS, 4)
