"""Soak: N concurrent streams with requests arriving continuously, against a server subprocess on 127.0.0.1.

Bounded in time and in count (the short run in `make test` ends after a number of requests, not seconds, so it
does the same work on any machine). Reports errors by status code (admission rejections counted apart), TTFT and
inter-token latency percentiles, and the server's RSS curve. The short run is part of `make test`; the long one:

    .venv/bin/python -m tests.soak --streams 64 --minutes 10 --out bench/results/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "generated"), str(ROOT)]

from tests.support.load import percentiles, timed_stream  # noqa: E402
from tests.support.servers import Subprocess  # noqa: E402
from tokenstream.v1 import generation_pb2 as pb  # noqa: E402
from tokenstream.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = ["Once upon a time", "你好，请介绍一下你自己。", "def quicksort(xs):", "The weather today", "床前明月光",
           "Explain gRPC streaming in one paragraph.", "1, 1, 2, 3, 5, 8,", "🙂 emoji and 中文 mixed text"]


@dataclass
class SoakReport:
    streams: int
    seconds: float
    requests: int = 0
    completed: int = 0
    tokens: int = 0
    admission_rejections: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    rss_growth_pct: float = 0.0

    @property
    def other_errors(self) -> int:
        return sum(self.errors.values())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


async def _worker(stub: pb_grpc.GenerationServiceStub, stop_at: float, max_requests: int | None,
                  rng: random.Random, report: SoakReport, ttft: list[float], itl: list[float], max_new: int) -> None:
    while time.monotonic() < stop_at and (max_requests is None or report.requests < max_requests):
        report.requests += 1
        req = pb.GenerateRequest(
            prompt=rng.choice(PROMPTS),
            sampling=pb.SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**32)),
            stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(8, max_new)),
        )
        try:
            timed, final = await timed_stream(stub, req, timeout_s=60)
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                report.admission_rejections += 1
            else:
                report.errors[err.code().name] = report.errors.get(err.code().name, 0) + 1
            continue
        report.tokens += timed["tokens"]
        report.completed += final is not None
        if timed["ttft_s"] is not None:
            ttft.append(timed["ttft_s"] * 1000)
        itl.extend(x * 1000 for x in timed["itl_s"])


async def soak(target: str, server_pid: int, streams: int, seconds: float, max_new: int = 48,
               seed: int = 0, max_requests: int | None = None) -> SoakReport:
    report = SoakReport(streams=streams, seconds=seconds)
    ttft: list[float] = []
    itl: list[float] = []
    rng = random.Random(seed)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        start = time.monotonic()
        stop_at = start + seconds
        # Staggered starts: requests keep arriving rather than all at once.
        workers = []
        for _ in range(streams):
            workers.append(asyncio.create_task(_worker(stub, stop_at, max_requests, random.Random(rng.random()),
                                                       report, ttft, itl, max_new)))
            await asyncio.sleep(0.01)  # arrival spacing, not synchronisation
        while not all(w.done() for w in workers):
            report.rss_mb.append((round(time.monotonic() - start, 1), round(rss_mb(server_pid), 1)))
            await asyncio.wait(workers, timeout=max(0.5, min(seconds, 600) / 60))
        elapsed = time.monotonic() - start
        report.seconds = round(elapsed, 1)
        report.rss_mb.append((round(elapsed, 1), round(rss_mb(server_pid), 1)))
    report.ttft_ms, report.itl_ms = percentiles(ttft), percentiles(itl)
    # Growth from the end of warm-up (the first tenth of the run) to the end.
    settle = [r for t, r in report.rss_mb if t >= elapsed / 10] or [r for _, r in report.rss_mb]
    report.rss_growth_pct = round(100.0 * (settle[-1] - settle[0]) / settle[0], 2)
    return report


def spawn_server(model_dir: str | None, extra: list[str]) -> Subprocess:
    server = Subprocess("--port", "0", *(["--model-dir", model_dir] if model_dir else []), *extra)
    server.wait_serving()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model-dir", default=None, help="default: the server's default model")
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    server = spawn_server(args.model_dir, ["--max-slots", str(args.max_slots), "--max-queue", "64",
                                           "--max-context", "512"])
    try:
        report = asyncio.run(soak(f"127.0.0.1:{server.port}", server.pid, args.streams, args.minutes * 60))
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(asdict(report), indent=2))
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "rss_mb"}, indent=2))
    print("rss (s, MB):", report.rss_mb[:: max(1, len(report.rss_mb) // 20)])
    return 0 if report.other_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
