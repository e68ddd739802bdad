"""The unread flood and the burst (#15), measured, not asserted.

    python -m bench.flood [--repo DIR] [--out FILE.json] [--quick]

Against a server subprocess on 127.0.0.1 (random-qwen2, 32 slots, queue 64), run from the checkout at --repo
(default: this one; point it at a worktree of an older commit for a before/after comparison):
  1. the flood: caller A (one bearer token) opens 150 streams (2,000 new tokens, logprobs with top_n 10, 180 s
     deadline) on one channel and does not read them; caller B (another token) sends a 16-token request 3 s into
     the flood and again 15 s into it. B's client-side TTFT, or its error, is recorded. Once the server has no
     stream left running or queued (its metrics say), A reads what its streams left: how each one ended;
  2. the burst: 96 streams that do read (64 tokens each) at once, then idle.
The server's RSS is sampled throughout: before, peak and after each phase. `--quick` (the smoke run of `make
test`) shrinks both phases to a few short streams: it checks that the harness runs, and measures nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.common import free_port, rss_bytes

REPO = Path(__file__).resolve().parents[1]
TOKENS = "bench-token-a,bench-token-b"


def rss_mb(pid: int) -> float:
    try:
        return rss_bytes(pid) / 2**20
    except (OSError, RuntimeError):  # the server has gone
        return 0.0


@dataclass(frozen=True)
class Plan:
    """The sizes of a run: the flood, caller B's arrivals into it, the burst, and the pauses between phases."""

    flood_streams: int = 150
    flood_tokens: int = 2000
    flood_deadline_s: float = 180
    b_at_s: tuple[float, ...] = (3.0, 15.0)
    burst_streams: int = 96
    burst_tokens: int = 64
    pause_s: float = 5.0


QUICK = Plan(flood_streams=8, flood_tokens=64, flood_deadline_s=60, b_at_s=(0.5,), burst_streams=8,
             burst_tokens=8, pause_s=0.5)


class Sampler:
    """The server's RSS every 0.25 s, with phase marks."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, float, str]] = []
        self.phase = "start"
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), rss_mb(self.pid), self.phase))
            await asyncio.sleep(0.25)  # a sampling period, not synchronisation

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def of(self, phase: str) -> list[float]:
        return [r for _, r, p in self.samples if p == phase]


def metrics(port: int) -> dict[str, float]:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


async def until_idle(metrics_port: int, limit_s: float) -> float:
    """Seconds until the server has nothing running or queued (polled: a measurement harness, not a test)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        m = metrics(metrics_port)
        if m.get("tokenstream_active_slots", 1) == 0 and m.get("tokenstream_queue_depth", 1) == 0:
            break
        await asyncio.sleep(1.0)
    return time.monotonic() - start


def start_server(repo: Path, port: int, metrics_port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{repo / 'generated'}:{repo}", "TOKENSTREAM_AUTH_TOKENS": TOKENS,
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--model-dir", "random-qwen2", "--max-slots", "32",
           "--max-queue", "64", "--max-context", "2048", "--max-new-tokens-limit", "2000",
           "--metrics-port", str(metrics_port)]
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def wait_serving(target: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        async for msg in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=600,
                                                               wait_for_ready=True):
            if msg.status == health_pb2.HealthCheckResponse.SERVING:
                return
    raise RuntimeError(f"health Watch of {target} ended without SERVING")


def bearer(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer bench-token-{name}")]


async def timed(stub: Any, pb: Any, prompt: str, n: int, who: str, timeout: float = 60) -> dict[str, Any]:
    start = time.perf_counter()
    req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n))
    ttft = None
    try:
        async for msg in stub.Generate(req, metadata=bearer(who), timeout=timeout):
            if ttft is None and msg.tokens:
                ttft = time.perf_counter() - start
            if msg.finish_reason:
                return {"ttft_s": ttft, "finish": pb.FinishReason.Name(msg.finish_reason)}
    except grpc.aio.AioRpcError as err:
        return {"ttft_s": ttft, "error": err.code().name, "details": (err.details() or "")[:200]}
    return {"ttft_s": ttft, "error": "no final message"}


async def flood_phase(target: str, metrics_port: int, pb: Any, pb_grpc: Any, plan: Plan) -> dict[str, Any]:
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(target, options=options) as flood_ch, \
            grpc.aio.insecure_channel(target) as ch:
        flood = pb_grpc.GenerationServiceStub(flood_ch)
        req = pb.GenerateRequest(prompt="flood", stopping=pb.StoppingCriteria(max_new_tokens=plan.flood_tokens),
                                 response=pb.ResponseOptions(logprobs=True, top_n=10))
        calls = [flood.Generate(req, metadata=bearer("a"), timeout=plan.flood_deadline_s)
                 for _ in range(plan.flood_streams)]
        stub = pb_grpc.GenerationServiceStub(ch)
        started = time.monotonic()
        b = []
        for at in plan.b_at_s:  # B arrives at these times into the flood
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            b.append({"at_s": at, **await timed(stub, pb, "caller b", 16, "b")})
        idle_after_s = await until_idle(metrics_port, plan.flood_deadline_s - 5)
        # Now read what A left, every stream at once: they share one connection, whose window a stream read
        # alone would wait on behind the others' unread data.
        outcomes = Counter(await asyncio.gather(*(_outcome(call, pb) for call in calls)))
    wanted = ("tokenstream_slow_readers_total", "tokenstream_preemptions_total", "tokenstream_displaced_total")
    counters = {k: v for k, v in metrics(metrics_port).items() if k in wanted}
    return {"b": b, "a_outcomes": dict(outcomes), "server_idle_after_s": round(idle_after_s + plan.b_at_s[-1], 1),
            "server_counters": counters}


async def _outcome(call: Any, pb: Any) -> str:
    last = None
    try:
        async for msg in call:
            last = msg
    except grpc.aio.AioRpcError as err:
        return err.code().name
    if last is None:
        return "none"
    return "slow reader" if "stopped reading" in last.error_message else pb.FinishReason.Name(last.finish_reason)


async def burst_phase(target: str, pb: Any, pb_grpc: Any, plan: Plan) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)
        results = await asyncio.gather(*(timed(stub, pb, f"burst {i}", plan.burst_tokens, "b", timeout=300)
                                         for i in range(plan.burst_streams)))
    return {"finished": sum(1 for r in results if "finish" in r), "errors": Counter(r.get("error") for r in results
                                                                                    if "error" in r)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    sys.path[:0] = [str(REPO / "generated")]
    from tokenstream.v1 import generation_pb2 as pb
    from tokenstream.v1 import generation_pb2_grpc as pb_grpc

    plan = QUICK if args.quick else Plan()
    port, metrics_port = free_port(), free_port()
    proc = start_server(Path(args.repo), port, metrics_port)
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target)
        sampler = Sampler(proc.pid)
        sampler.start()
        await asyncio.sleep(plan.pause_s / 2)  # an idle baseline
        sampler.phase = "flood"
        flood = await flood_phase(target, metrics_port, pb, pb_grpc, plan)
        sampler.phase = "after flood"
        await asyncio.sleep(plan.pause_s)
        sampler.phase = "burst"
        burst = await burst_phase(target, pb, pb_grpc, plan)
        sampler.phase = "after burst"
        await asyncio.sleep(plan.pause_s)
    finally:
        proc.terminate()
        proc.wait(60)

    def summary(phase: str) -> dict[str, float]:
        xs = sampler.of(phase)
        return {"min": round(min(xs), 1), "max": round(max(xs), 1), "last": round(xs[-1], 1)} if xs else {}

    return {"repo": str(args.repo), "plan": asdict(plan), "flood": flood, "burst": burst,
            "rss_mb": {p: summary(p) for p in ("start", "flood", "after flood", "burst", "after burst")},
            "allocator": {k: v for k, v in os.environ.items() if k.startswith(("FLAGS_", "MALLOC_"))}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.flood", description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(REPO), help="checkout whose server to run (default: this one)")
    p.add_argument("--out", default="")
    p.add_argument("--quick", action="store_true", help="a few short streams: the harness runs, nothing measured")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
