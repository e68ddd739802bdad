"""Server assembly and lifecycle: start (model loads in the background), serve, drain on SIGTERM, stop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from service.config import Config
from service.engine.api import EngineClient
from service.engine.checkpoints.loader import load_model
from service.engine.checkpoints.registry import locate
from service.engine.hooks import EngineHooks
from service.engine.scheduler import Engine
from service.generation import GenerateRunner
from service.metrics import Metrics
from service.request_telemetry import RequestTelemetry
from service.security import BearerAuthInterceptor, load_tokens, server_credentials
from service.servicer import GenerationServicer, add_to_server
from service.state import ServerState
from service.telemetry import get_tracer
from service.vllm_front import SERVICE_NAME as VLLM_SERVICE_NAME
from service.vllm_front import VllmEngineServicer
from service.vllm_front import add_to_server as add_vllm_to_server
from tokenstream.v1 import generation_pb2 as pb

if TYPE_CHECKING:
    from service.http.app import HttpServer

log = logging.getLogger("tokenstream.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
# Health names: the server, and each contract it serves on this port (ours, and vLLM's beside it).
HEALTH_NAMES = ("", SERVICE_NAME, VLLM_SERVICE_NAME)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def load_engine(config: Config, hooks: EngineHooks | None = None) -> EngineClient:
    """Blocking: locate (or fetch) the model, load it, build and warm up the engine. Hooks are for tests only."""
    name, checkpoint = locate(config.model_dir, config.model_cache_path)
    model = load_model(checkpoint, dtype=config.engine.dtype, trust_pickle=config.trust_pickle)
    model.name = name
    engine = Engine(model, config.engine, hooks=hooks)
    engine.start(warmup=True)
    return engine


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    state: ServerState
    health: health_aio.HealthServicer
    load_task: asyncio.Task[None]
    metrics: Metrics
    metrics_port: int = 0
    watchdog_task: asyncio.Task[None] | None = None
    _metrics_http: object = None
    http: HttpServer | None = None  # the OpenAI-compatible HTTP front, when config.http_port is set
    http_port: int = 0

    async def wait_ready(self) -> None:
        await self.load_task

    async def _set_health(self, status: int) -> None:
        for name in HEALTH_NAMES:
            await self.health.set(name, status)

    async def drain(self, grace_s: float) -> None:
        """Stop admitting (UNAVAILABLE; 503 on HTTP), refuse at once the requests the engine has not started (the
        same UNAVAILABLE: nothing was sent, so clients retry them elsewhere), let started streams of both fronts
        finish for grace_s, then end the rest with a final message."""
        self.state.draining = True
        self.state.refuse_unstarted()  # queued, never started: UNAVAILABLE now, so clients retry elsewhere
        await self.health.enter_graceful_shutdown()
        if self.state.active_streams:
            try:
                await asyncio.wait_for(self.state.drained.wait(), grace_s)
            except TimeoutError:
                log.warning("grace period over: cancelling %d streams", self.state.active_streams)
        engine = self.state.engine
        if engine is not None and self.state.active_streams:
            engine.cancel_all()  # each remaining stream gets its final message, FINISH_REASON_CANCELLED
            try:
                await asyncio.wait_for(self.state.drained.wait(), 5.0)
            except TimeoutError:
                log.error("%d streams did not end after cancellation", self.state.active_streams)

    async def watchdog(self) -> None:
        """Liveness: NOT_SERVING for "" when the engine thread is dead, or has not stepped for watchdog_s
        while work is queued. Runs on the event loop, so health answers never wait for a decode step."""
        live = True
        interval_s = min(1.0, self.state.config.watchdog_s / 4)
        while True:
            await asyncio.sleep(interval_s)  # a periodic check, not synchronisation
            engine = self.state.engine
            if engine is None or self.state.draining:
                continue
            stats = engine.stats()
            busy = stats.active + stats.prefilling + stats.waiting > 0
            stalled = busy and time.monotonic() - stats.last_iteration_monotonic > self.state.config.watchdog_s
            ok = stats.alive and not stalled
            if ok != live:
                live = ok
                log.error("engine %s", "recovered" if ok else ("thread died" if not stats.alive else "stalled"))
                await self._set_health(SERVING if ok else NOT_SERVING)

    async def stop(self, grace_s: float = 0.0) -> None:
        if self.watchdog_task is not None:
            self.watchdog_task.cancel()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()  # type: ignore[attr-defined]
        if not self.load_task.done():
            self.load_task.cancel()
        if self.http is not None:
            await asyncio.gather(self.server.stop(grace_s), self.http.stop(grace_s))
        else:
            await self.server.stop(grace_s)
        if self.state.engine is not None:
            await asyncio.to_thread(self.state.engine.stop)


EngineLoader = Callable[[Config], EngineClient]


async def start_server(
    config: Config, *, tracer_provider: trace.TracerProvider | None = None, loader: EngineLoader = load_engine
) -> RunningServer:
    """Bind and start serving at once (health NOT_SERVING), loading the model in a background thread."""
    interceptors = []
    if tracer_provider is not None:
        # Health checks are probes, not requests: keep them out of traces. Generate makes its own server span
        # (service/request_telemetry.py), shared with the HTTP front.
        interceptors.append(aio_server_interceptor(tracer_provider=tracer_provider, filter_=filters.negate(
            filters.any_of(filters.health_check(), filters.method_name("Generate")))))
    tokens = load_tokens(config)
    if tokens:
        interceptors.append(BearerAuthInterceptor(tokens, protect_reflection=config.auth_reflection))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.max_metadata_size", config.max_metadata_bytes),  # soft limit
            ("grpc.absolute_max_metadata_size", config.max_metadata_bytes),  # hard limit
            # Long-lived streams: accept client keepalive pings down to every 10 s, even without calls.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.so_reuseport", 0),
        ],
    )
    state = ServerState(config=config, auth_on=bool(tokens))
    metrics = Metrics(lambda: state.engine.stats() if state.engine is not None else None)
    tracer = get_tracer(tracer_provider)
    health = health_aio.HealthServicer()
    for name in HEALTH_NAMES:
        await health.set(name, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    runner = GenerateRunner(state, RequestTelemetry(tracer, metrics))
    add_to_server(GenerationServicer(runner), server)
    add_vllm_to_server(VllmEngineServicer(runner), server)  # vLLM's contract, on the same runner and engine
    reflection.enable_server_reflection((SERVICE_NAME, VLLM_SERVICE_NAME,
                                         health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME), server)
    credentials = server_credentials(config)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc says only "Failed to bind"
        raise BindError("gRPC", config.host, config.port, exc) from None
    await server.start()

    async def load() -> None:
        engine = await _in_daemon_thread(loader, config)
        state.config = dataclasses.replace(config, port=port)
        state.engine = engine
        for name in HEALTH_NAMES:
            await health.set(name, SERVING)
        log.info("serving %s on %s:%d", engine.info.name, config.host, port)

    http: HttpServer | None = None
    metrics_http: Any = None
    try:  # every port is bound before the model loads; a taken one stops what started, and says which it was
        if config.http_port != 0:  # -1 picks a free port (tests); imported only when on
            from service.http.app import start_http

            try:
                http = await start_http(config, runner, tokens)
            except OSError as exc:
                raise BindError("HTTP", config.host, config.http_port, exc) from None
        if config.metrics_port != 0:  # -1 picks a free port (tests)
            try:
                metrics_http = metrics.serve(config.host, max(config.metrics_port, 0))
            except OSError as exc:
                raise BindError("metrics", config.host, config.metrics_port, exc) from None
    except BaseException:
        if http is not None:
            await http.stop(0)
        await server.stop(0)
        raise
    running = RunningServer(server, port, state, health, asyncio.create_task(load()), metrics, http=http,
                            http_port=http.port if http is not None else 0)
    if metrics_http is not None:
        running._metrics_http = metrics_http
        running.metrics_port = int(metrics_http.server_port)
    running.watchdog_task = asyncio.create_task(running.watchdog())
    return running


class BindError(RuntimeError):
    """A front could not listen on its port: which front, which address, and why, in one line."""

    def __init__(self, front: str, host: str, port: int, exc: BaseException) -> None:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        super().__init__(f"cannot listen for {front} on {host}:{port}: {why}")


async def _in_daemon_thread(fn: Callable[[Config], EngineClient], config: Config) -> EngineClient:
    """fn(config) in a daemon thread: a SIGTERM during a model load need not wait for the load (asyncio.to_thread's
    executor is joined at exit). An engine that finishes loading after its waiter left is stopped."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[EngineClient] = loop.create_future()

    def settle(result: EngineClient | None, exc: BaseException | None) -> None:
        if done.cancelled():
            if result is not None:
                result.stop()
        elif exc is not None:
            done.set_exception(exc)
        else:
            done.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        result, error = None, None
        try:
            result = fn(config)
        except BaseException as exc:  # noqa: BLE001 -- handed to the waiter
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop has closed: nobody waits for this engine
            if result is not None:
                result.stop()

    threading.Thread(target=run, name="tokenstream-load", daemon=True).start()
    return await done


async def serve(config: Config, tracer_provider: trace.TracerProvider | None = None,
                loader: EngineLoader = load_engine) -> None:
    """Serve until SIGTERM or SIGINT, then drain and exit. (`loader` is how test entry points add hooks.)"""
    sys.setswitchinterval(config.switch_interval_ms / 1000.0)
    running = await start_server(config, tracer_provider=tracer_provider, loader=loader)
    log.info("listening on %s:%d (health NOT_SERVING until the model is warm)", config.host, running.port,
             extra={"fields": {"event": "listening", "port": running.port, "metrics_port": running.metrics_port,
                               "http_port": running.http_port}})
    if running.http is not None:
        log.info("chat page and OpenAI-compatible API (/v1) at %s://%s:%d/", running.http.scheme, config.host,
                 running.http_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    def on_loaded(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            stop.set()  # the model failed to load: exit with its error

    running.load_task.add_done_callback(on_loaded)
    await stop.wait()
    if running.load_task.done() and not running.load_task.cancelled() and running.load_task.exception():
        await running.stop(0)
        raise running.load_task.exception()  # type: ignore[misc]
    log.info("signal received: draining for up to %.1f s", config.grace_s)
    await running.drain(config.grace_s)
    await running.stop(1.0)
    log.info("stopped")
