"""Real servers for tests: in-process on a background event loop, or as a subprocess of the test entry point."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Config, config_from
from service.engine.api import EngineClient, default_model_cache
from service.engine.checkpoints.registry import locate
from service.engine.scheduler import Engine
from service.server import RunningServer, load_engine, start_server
from tests.support.hooks import StepGate
from tests.support.ports import free_port  # noqa: F401 -- re-exported for the tests

ROOT = Path(__file__).resolve().parents[2]


def suite_model_dir() -> Path:
    """The suite's model: 2 layers, hidden 64, GQA 4/2, the real Qwen2 vocabulary (151,936), random weights."""
    _, path = locate("test", default_model_cache())
    return Path(path)


def base_config(model_dir: Path | str, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "host": "127.0.0.1", "port": 0, "model_dir": str(model_dir), "max_context": 512, "max_slots": 8,
        "max_queue": 16, "max_new_tokens": 32, "grace_s": 5.0,
    }
    values.update(overrides)
    return config_from(values)


def loader_with(hooks: StepGate) -> Callable[[Config], EngineClient]:
    return lambda config: load_engine(config, hooks=hooks)


class ServerThread:
    """A real grpc.aio server on its own event loop in a background thread; tests talk to it over TCP."""

    def __init__(self, config: Config, tracer_provider: Any = None,
                 loader: Callable[[Config], EngineClient] = load_engine, hooks: StepGate | None = None) -> None:
        self.hooks = hooks
        if hooks is not None:
            loader = loader_with(hooks)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningServer = self.call(start_server(config, tracer_provider=tracer_provider, loader=loader))
        self.port = self.running.port
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call_soon(self, coro: Any) -> Future:
        """Start a coroutine on the server's loop without waiting for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.call(self.running.wait_ready(), timeout)

    @property
    def engine(self) -> Engine:
        engine = self.running.state.engine
        assert isinstance(engine, Engine)
        return engine

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)

    def close(self) -> None:
        if self.hooks is not None:
            self.hooks.thaw()
            self.hooks.open()  # let nothing hold the engine while it stops
        try:
            self.call(self.running.stop(0), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def started(config: Config, **kwargs: Any) -> ServerThread:
    server = ServerThread(config, **kwargs)
    server.wait_ready()
    return server


class Subprocess:
    """The server as a real process, started through the test entry point (`python -m tests.support.serve`).

    With gated=True its engine takes decode steps only when `step()` says so, through the process's stdin;
    everything else is `python -m service`'s own behaviour. With hold_load=True the model load waits in its
    thread until `release_load()`.
    """

    def __init__(self, *args: str, gated: bool = False, hold_load: bool = False) -> None:
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'generated'}:{ROOT}:{ROOT / 'clients'}", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "tests.support.serve", *(["--gated"] if gated else []),
               *(["--hold-load"] if hold_load else []), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        self.info: dict = {}
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                self.info = json.loads(line)
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()} before listening:\n{''.join(self.log)}")
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = int(self.info["port"])
        self.pid = self.proc.pid

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def command(self, line: str) -> None:
        """Send a command to the test entry point and wait for its `ok` (see tests/support/serve.py)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        assert reply == "ok", f"{line!r} got {reply!r}; server log:\n{''.join(self.log[-20:])}"

    def step(self, steps: int) -> None:
        """Let the engine take `steps` decode steps; returns once it has."""
        self.command(f"step {steps}")

    def await_active(self, n: int) -> None:
        self.command(f"active {n}")

    def await_waiting(self, n: int) -> None:
        self.command(f"waiting {n}")

    def await_loading(self) -> None:
        """Answer once the model load has started (and, with hold_load, is being held)."""
        self.command("loading")

    def release_load(self) -> None:
        self.command("load")

    def wait_serving(self, host: str = "127.0.0.1", timeout: float = 300) -> None:
        wait_serving(f"{host}:{self.port}", timeout)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


class NotServingError(RuntimeError):
    """The health Watch ended, or failed, before the server reported SERVING."""


def wait_serving(target: str, timeout: float = 300, service: str = "") -> None:
    """Block on Health.Watch until `service` is SERVING (the model is loaded and warm). Raises NotServingError,
    naming the last status seen, when the Watch ends or fails (its deadline included) before that."""
    last = "no status"
    with grpc.insecure_channel(target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service),
                                                          timeout=timeout, wait_for_ready=True)
        try:
            for msg in watch:
                if msg.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(msg.status)
        except grpc.RpcError as err:
            raise NotServingError(f"health Watch of {target}: {err.code().name} at {last}") from err
    raise NotServingError(f"health Watch of {target} ended at {last}, never SERVING")
