"""The HTTP front: OpenAI-compatible /v1 endpoints (JSON and SSE) and the chat page, served by uvicorn on the
gRPC server's own event loop, onto the same engine.

Like the gRPC servicer it only translates: headers into a CallInfo (calls.py), JSON into GenerateParams
(requests.py), chunks back into OpenAI objects (responses.py), exceptions into HTTP errors (errors.to_http). A request's
life, with its admission, span, metrics and log line, is service/generation.py, shared with gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
import socket
import time
from collections.abc import AsyncGenerator, Iterator
from importlib import resources
from typing import Any

import anyio
import h11
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.calls import CallInfo, Front, read_call
from service.config import Config
from service.engine.types import Chunk, Finish
from service.errors import (
    FieldViolation,
    InvalidRequestError,
    ModelNotFoundError,
    UnauthenticatedError,
    UnsupportedMediaTypeError,
    http_status,
    to_http,
)
from service.generation import GenerateRunner
from service.http.requests import Parsed, openai_sampling_defaults, parse_chat, parse_completion
from service.http.responses import Responder, engine_error, model_card
from service.security import authorized, http_tls_options

log = logging.getLogger("tokenstream.requests")
server_log = logging.getLogger("tokenstream.server")

SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
               (b"x-accel-buffering", b"no")]
SEND_BUFFER_BYTES = 256 * 1024
HTTP = Front("http", "http.response.status_code", http_status, openai_sampling_defaults)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _frame(obj: Any) -> bytes:
    return b"data: " + _json_bytes(obj) + b"\n\n"


def _page() -> tuple[bytes, str]:
    """The chat page, and a Content-Security-Policy that admits its own inline script and style, and nothing
    from elsewhere (no CDN: machines may be offline)."""
    html = resources.files("service.http").joinpath("page.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
           "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode(), csp


class HttpFront:
    """The Starlette app: routes, auth, and the translation of each request onto GenerateRunner.run."""

    def __init__(self, runner: GenerateRunner, tokens: tuple[bytes, ...]) -> None:
        self.runner = runner
        self.state = runner.state
        self.tokens = tokens
        self.created = int(time.time())
        self.page, self.csp = _page()
        self.app = Starlette(
            routes=[
                Route("/", self.index, methods=["GET"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                # Prometheus, as on the metrics port (no auth there either): the inference gateway's endpoint
                # picker scrapes each pod's serving port by default (service/metrics.py).
                Route("/metrics", self.metrics, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_exception, Exception: self._internal},
        )

    @property
    def config(self) -> Config:
        return self.state.config

    # -- routes ----------------------------------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        return Response(self.page, media_type="text/html; charset=utf-8",
                        headers={"content-security-policy": self.csp, "cache-control": "no-cache",
                                 "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"})

    async def metrics(self, request: Request) -> Response:
        body, content_type = self.runner.telemetry.metrics.exposition(request.headers.get("accept"))
        return Response(body, headers={"content-type": content_type, "cache-control": "no-cache"})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
            info = self.state.ready_engine().info
        except Exception as exc:  # noqa: BLE001 -- mapped in errors.py
            return _error_response(exc)
        return JSONResponse({"object": "list", "data": [model_card(info.name, info.max_context, self.created)]})

    async def model(self, request: Request) -> Response:
        asked = request.path_params["model"]
        try:
            self._authorize(request)
            info = self.state.ready_engine().info
            if asked != info.name:
                raise ModelNotFoundError([FieldViolation("model", f"{asked!r} is not served here")])
        except Exception as exc:  # noqa: BLE001 -- mapped in errors.py
            return _error_response(exc)
        return JSONResponse(model_card(info.name, info.max_context, self.created))

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    # -- generation --------------------------------------------------------------------------------------------

    async def _generate(self, request: Request, chat: bool) -> Response:
        peer = request.client.host if request.client else "unknown"
        call = read_call(self.state, dict(request.headers), peer, HTTP, f"POST {request.url.path}",
                         {"http.request.method": "POST", "http.route": request.url.path,
                          "url.scheme": request.url.scheme, "network.peer.address": peer})
        parsed: Parsed | None = None
        try:
            self._authorize(request)
            engine = self.state.ready_engine()
            _check_json_body(request)
            body = await _read_json(request, self.config.max_receive_message_bytes)
            parse = parse_chat if chat else parse_completion
            parsed = parse(body, engine.info.name)
        except Exception as exc:  # noqa: BLE001 -- mapped in errors.py
            return self._rejected(call, exc, parsed)
        responder = Responder(parsed, engine.info.name, call.request_id, engine.info.eos_token_ids,
                              engine.tokenizer.token_bytes)
        return GenerationResponse(self.runner.run(parsed.params, call), parsed, responder, call.request_id)

    def _authorize(self, request: Request) -> None:
        if self.tokens and not authorized(self.tokens, request.headers.getlist("authorization")):
            raise UnauthenticatedError("missing or invalid bearer token (Authorization: Bearer <token>)")

    def _rejected(self, call: CallInfo, exc: BaseException, parsed: Parsed | None) -> Response:
        """A request refused before it reached GenerateRunner.run: its error, and (unless it was not authenticated,
        as on the gRPC front) the same span, metric and log line as a request that run refuses."""
        error = _error_response(exc, call.request_id, parsed)
        if isinstance(exc, UnauthenticatedError):
            return error
        self.runner.reject(call, exc)
        return error

    # -- errors that Starlette raises (unknown route, wrong method) or lets through --------------------------------

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind, code = {404: ("not_found_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}.get(
            exc.status_code, ("invalid_request_error", "invalid_argument"))
        body = {"error": {"message": f"{exc.detail}: {request.method} {request.url.path}", "type": kind,
                          "param": None, "code": code}}
        return JSONResponse(body, exc.status_code, headers=exc.headers)

    async def _internal(self, request: Request, exc: Exception) -> Response:
        server_log.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(exc)


def _error_response(exc: BaseException, request_id: str = "", parsed: Parsed | None = None) -> Response:
    error = to_http(exc, parsed.param_name if parsed is not None else _spell_unparsed)
    headers = dict(error.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(error.body, error.status, headers=headers)


def _spell_unparsed(path: str) -> str | None:
    return None if path in ("body", "request") else path


def _check_json_body(request: Request) -> None:
    """POST bodies are JSON, and say so: a cross-site page can send text/plain (or a form) without asking first,
    but not application/json, so this refuses generations started by any web page a user happens to visit."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError([FieldViolation(
            "content-type", f"must be application/json, not {media_type or 'missing'}")])


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, read up to `limit` bytes."""
    too_large = InvalidRequestError([FieldViolation("body", f"the request body is larger than {limit} bytes")])
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise too_large
    try:
        return json.loads(data)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError both
        raise InvalidRequestError([FieldViolation("body", f"the request body is not valid JSON ({exc})")]) from exc
    except RecursionError as exc:  # arrays or objects nested deeper than the parser goes
        raise InvalidRequestError([FieldViolation("body", "the request body is nested too deeply")]) from exc


class GenerationResponse(Response):
    """One generation's response: SSE or one JSON object. It watches the connection the whole time, so a client
    that leaves cancels the engine work at once (between tokens, or while the request waits for a slot), whatever
    ASGI version the server speaks; and errors raised before the first chunk still get their own HTTP status."""

    def __init__(self, run: AsyncGenerator[Chunk, None], parsed: Parsed, responder: Responder,
                 request_id: str) -> None:
        super().__init__()
        self.run = run
        self.parsed = parsed
        self.responder = responder
        self.request_id = request_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tasks:

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                tasks.cancel_scope.cancel()

            tasks.start_soon(watch)
            try:
                await (self._stream(send) if self.parsed.stream else self._whole(send))
            finally:
                tasks.cancel_scope.cancel()
                # A client that left while a chunk was being sent leaves `run` suspended at a yield: close it now,
                # so the engine stream is cancelled and the span and log line are written (no await suspends there).
                await self.run.aclose()

    async def _start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        headers = [*headers, (b"x-request-id", self.request_id.encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _send_error(self, send: Send, exc: BaseException) -> None:
        error = to_http(exc, self.parsed.param_name)
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await self._start(send, error.status, headers)
        await send({"type": "http.response.body", "body": _json_bytes(error.body)})

    async def _stream(self, send: Send) -> None:
        try:
            chunk: Chunk | None = await anext(self.run)
        except Exception as exc:  # noqa: BLE001 -- refused before streaming: its own status, mapped in errors.py
            await self._send_error(send, exc)
            return
        await self._start(send, 200, SSE_HEADERS)
        while chunk is not None:
            frames = []
            if chunk.finish is Finish.ERROR:
                frames.append(_frame(engine_error(chunk)))
            elif (obj := self.responder.chunk(chunk)) is not None:
                frames.append(_frame(obj))
            if chunk.finish not in (None, Finish.ERROR) and self.parsed.include_usage:
                frames.append(_frame(self.responder.usage_chunk()))
            if frames:
                await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
            try:
                chunk = await anext(self.run)
            except StopAsyncIteration:
                chunk = None
            except Exception as exc:  # noqa: BLE001 -- after the status line, an error can only be an event
                body = to_http(exc, self.parsed.param_name).body
                await send({"type": "http.response.body", "body": _frame(body), "more_body": True})
                chunk = None
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    async def _whole(self, send: Send) -> None:
        chunks: list[Chunk] = []
        try:
            chunks = [chunk async for chunk in self.run]
        except Exception as exc:  # noqa: BLE001 -- mapped in errors.py
            await self._send_error(send, exc)
            return
        failed = chunks[-1].finish is Finish.ERROR
        status, body = (500, engine_error(chunks[-1])) if failed else (200, self.responder.whole(chunks))
        await self._start(send, status, [(b"content-type", b"application/json")])
        await send({"type": "http.response.body", "body": _json_bytes(body)})


def _without_port(host: str) -> str:
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() and not host.endswith("]") else host


def _host_guard(app: ASGIApp, allowed_hosts: str) -> ASGIApp:
    """Only requests whose Host is allowed (with or without its port), against DNS rebinding; all, if none is set."""
    hosts = {h.strip().lower() for h in allowed_hosts.split(",") if h.strip()}
    if not hosts:
        return app

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "").lower()
            if host not in hosts and _without_port(host) not in hosts:
                refused = InvalidRequestError([FieldViolation("host", f"{host!r} is not a host this server answers")])
                await _error_response(refused)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded


class _GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, with a header-receipt timeout and a connection limit (against slowloris): a
    connection that has not sent a whole request head within `header_timeout_s` of opening, or of its last
    response, is closed; a connection beyond `max_connections` is closed at once."""

    header_timeout_s = 5.0
    max_connections = 0  # 0: no limit

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if self.max_connections and len(self.connections) > self.max_connections:
            transport.close()
            return
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # no complete request head yet
            self.transport.close()


def _protocol(config: Config) -> type[H11Protocol]:
    """The protocol class for this server's settings (uvicorn makes one instance per connection)."""
    return type("GuardedH11", (_GuardedH11,), {"header_timeout_s": config.http_header_timeout_s,
                                               "max_connections": config.http_max_connections})


class _Uvicorn(uvicorn.Server):
    """uvicorn on a loop it does not own: SIGTERM and SIGINT stay the gRPC server's (serve() drains both fronts)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


class HttpServer:
    """The HTTP front being served: uvicorn's serve() as a task on the running loop."""

    def __init__(self, server: _Uvicorn, task: asyncio.Task[None], listener: socket.socket, scheme: str) -> None:
        self.server = server
        self._task = task
        self.listener = listener
        self.port = int(listener.getsockname()[1])
        self.scheme = scheme

    async def stop(self, grace_s: float) -> None:
        """Close the listener and idle connections; responses still running get grace_s, then are cancelled."""
        self.server.config.timeout_graceful_shutdown = max(grace_s, 0.1)  # type: ignore[assignment]
        self.server.should_exit = True
        await self._task


async def start_http(config: Config, runner: GenerateRunner, tokens: tuple[bytes, ...]) -> HttpServer:
    """Bind config.host:config.http_port (-1: a free port) and serve the HTTP front, with the same TLS as gRPC."""
    front = HttpFront(runner, tokens)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on connections whose socket says IPPROTO_TCP, and without it
    # Nagle holds each SSE frame written after the headers until the client's delayed ACK (+40 ms TTFT, measured).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Connections inherit a bounded kernel send buffer (instead of autotuning up to 4 MB), so a client that stops
    # reading stops the front's writes after about as much as gRPC's HTTP/2 window, and the engine's slow-reader
    # ending (max_backlog) applies on both fronts. Token streams need far less than this per connection.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
    sock.bind((config.host, max(config.http_port, 0)))
    tls = http_tls_options(config)
    # h11 named rather than "auto", which would switch to httptools wherever that happens to be installed.
    # X-Forwarded-For is read by service/callers.py, from trusted proxies only (proxy_headers off here).
    server = _Uvicorn(uvicorn.Config(_host_guard(front.app, config.allowed_hosts), http=_protocol(config),
                                     log_config=None, access_log=False, lifespan="off",
                                     ws="none", server_header=False, proxy_headers=False, **tls))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    listening = asyncio.create_task(server.listening.wait())
    await asyncio.wait([task, listening], return_when=asyncio.FIRST_COMPLETED)
    if not server.listening.is_set():
        listening.cancel()
        sock.close()
        await task  # raises why uvicorn could not start (its SystemExit included)
        raise RuntimeError("the HTTP front stopped before it listened")
    return HttpServer(server, task, sock, "https" if tls else "http")
