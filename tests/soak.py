"""Soak: N concurrent streams with requests arriving continuously, against a server subprocess on 127.0.0.1.

Bounded in time and in count (the short run in `make test` ends after a number of requests, not seconds, so it
does the same work on any machine). Reports errors by status code (admission rejections counted apart), TTFT and
inter-token latency percentiles, and the server's memory by completed requests. The short run is part of
`make test`; the long one:

    .venv/bin/python -m tests.soak --streams 64 --minutes 10 --out bench/results/soak.json

Nothing here assumes the machine's speed. Memory is sampled every few completed requests and judged per request
after a warm-up (also a count of requests): RSS less what the prefix cache holds, which grows by design up to its
budget (1 GiB by default; with SmolLM2 a request keeps ~1 MB). Client deadlines follow the machine: a warm-up request
gets only a hang detector, each later one a multiple of the slowest warm-up request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
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

HANG_S = 600.0  # a warm-up request's deadline: one still running after ten minutes is hung, however slow the machine
DEADLINE_FACTOR = 10.0  # after the warm-up, a request's deadline is this many times the slowest warm-up request
MIN_DEADLINE_S = 30.0  # ...and never less: a fast machine's warm-up says little about a stall of a few seconds
# A leak: memory growing by more than this per request after the warm-up. Measured on 2 cores: the suite's model,
# 16 streams, 1 to 10 KiB per request (about 256 with a planted 256 KiB leak); SmolLM2, 64 streams, 15 KiB per request
# while RSS itself grew by 420 as the prefix cache filled.
LEAK_KIB_PER_REQUEST = 64.0
# RSS falling by more than this between two samples is heap handed back to the system, never a leak: here the server
# hands back ~90 MB of start-up heap in one fall, 150 to 200 requests in. Growth is judged between such falls.
TRIM_MB = 8.0


@dataclass
class SoakReport:
    streams: int
    seconds: float
    warmup: int  # the first requests: no memory sample, and only the hang detector for a deadline
    requests: int = 0
    completed: int = 0
    tokens: int = 0
    admission_rejections: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    ttft_ms: dict[str, float] = field(default_factory=dict)
    itl_ms: dict[str, float] = field(default_factory=dict)
    slowest_warmup_s: float = 0.0
    deadline_s: float = HANG_S  # each request's after the warm-up: DEADLINE_FACTOR times its slowest, or more
    # After the warm-up, every few ended requests: (requests ended, server RSS, its prefix cache's bytes), in MB.
    memory_mb: list[tuple[int, float, float]] = field(default_factory=list)
    kib_per_request: float | None = None  # growth of RSS less the prefix cache; None: too few samples to judge

    @property
    def other_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def memory_flat(self) -> bool:
        return self.kib_per_request is not None and self.kib_per_request <= LEAK_KIB_PER_REQUEST


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class ServerMemory:
    """Where the server's memory is read: its RSS, and what its prefix cache holds, from its metrics (none without
    them)."""

    pid: int
    metrics_url: str | None = None

    def sample(self) -> tuple[float, float]:
        return rss_mb(self.pid), self.prefix_cache_mb()

    def prefix_cache_mb(self) -> float:
        if self.metrics_url is None:
            return 0.0
        with urllib.request.urlopen(self.metrics_url, timeout=60) as reply:
            for line in reply.read().decode().splitlines():
                if line.startswith("tokenstream_prefix_cache_bytes "):
                    return float(line.split()[1]) / 2**20
        raise RuntimeError(f"no tokenstream_prefix_cache_bytes at {self.metrics_url}")


def growth_per_request(samples: list[tuple[int, float]], trim: float = TRIM_MB) -> float:
    """Memory growth per request: the least-squares slope within each run of samples between falls of more than
    `trim` (one slope for all runs, each run at its own level), so that a trim cannot hide a leak."""
    runs: list[list[tuple[int, float]]] = []
    for x, y in samples:
        if not runs or y < runs[-1][-1][1] - trim:
            runs.append([])
        runs[-1].append((x, y))
    sxy = sxx = 0.0
    for run in runs:
        mx, my = sum(x for x, _ in run) / len(run), sum(y for _, y in run) / len(run)
        sxy += sum((x - mx) * (y - my) for x, y in run)
        sxx += sum((x - mx) ** 2 for x, _ in run)
    if not sxx:
        raise ValueError(f"too few memory samples to judge growth: {samples}")
    return sxy / sxx


class Progress:
    """What the workers share: requests ended, the end of the warm-up (no measured request starts before it, so the
    engine is not loaded by requests with the hang detector's deadline), the measured deadline and the memory."""

    def __init__(self, report: SoakReport, memory: ServerMemory, sample_every: int, min_deadline_s: float,
                 after_warmup: Callable[[], None]) -> None:
        self.report = report
        self.memory = memory
        self.sample_every = sample_every
        self.min_deadline_s = min_deadline_s
        self.after_warmup = after_warmup
        self.ended = 0
        self.warmed = asyncio.Event()
        if report.warmup == 0:
            self._warmed()

    def deadline_s(self) -> float:
        return self.report.deadline_s if self.warmed.is_set() else HANG_S

    async def end(self, seconds: float) -> None:
        self.ended += 1
        ended, report = self.ended, self.report
        if ended <= report.warmup:
            report.slowest_warmup_s = max(report.slowest_warmup_s, seconds)
            if ended == report.warmup:
                self._warmed()
        elif (ended - report.warmup) % self.sample_every == 0:
            rss, kept = await asyncio.to_thread(self.memory.sample)  # off the loop: the streams read on meanwhile
            report.memory_mb.append((ended, round(rss, 1), round(kept, 1)))

    def _warmed(self) -> None:
        self.report.deadline_s = max(self.min_deadline_s, DEADLINE_FACTOR * self.report.slowest_warmup_s)
        self.after_warmup()
        self.warmed.set()


async def _worker(stub: pb_grpc.GenerationServiceStub, stop_at: float, max_requests: int | None,
                  rng: random.Random, progress: Progress, ttft: list[float], itl: list[float], max_new: int) -> None:
    report = progress.report
    while time.monotonic() < stop_at and (max_requests is None or report.requests < max_requests):
        report.requests += 1
        if report.requests > report.warmup:
            await progress.warmed.wait()
        req = pb.GenerateRequest(
            prompt=rng.choice(PROMPTS),
            sampling=pb.SamplingParams(temperature=rng.choice([0.0, 0.8]), seed=rng.randrange(2**32)),
            stopping=pb.StoppingCriteria(max_new_tokens=rng.randint(8, max_new)),
        )
        started = time.monotonic()
        try:
            timed, final = await timed_stream(stub, req, timeout_s=progress.deadline_s())
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                report.admission_rejections += 1
            else:
                report.errors[err.code().name] = report.errors.get(err.code().name, 0) + 1
            await progress.end(time.monotonic() - started)
            continue
        await progress.end(time.monotonic() - started)
        report.tokens += timed["tokens"]
        report.completed += final is not None
        if timed["ttft_s"] is not None:
            ttft.append(timed["ttft_s"] * 1000)
        itl.extend(x * 1000 for x in timed["itl_s"])


async def soak(target: str, memory: ServerMemory, streams: int, seconds: float = math.inf, max_new: int = 48,
               seed: int = 0, max_requests: int | None = None, warmup: int | None = None,
               sample_every: int | None = None, min_deadline_s: float = MIN_DEADLINE_S,
               after_warmup: Callable[[], None] = lambda: None) -> SoakReport:
    """Bounded by `seconds` and `max_requests`. `warmup` (default: four requests per stream) and `sample_every`
    (default: a quarter of the streams) count ended requests; `after_warmup` runs once the warm-up has ended."""
    report = SoakReport(streams=streams, seconds=seconds, warmup=4 * streams if warmup is None else warmup)
    progress = Progress(report, memory, sample_every or max(1, streams // 4), min_deadline_s, after_warmup)
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
                                                       progress, ttft, itl, max_new)))
            await asyncio.sleep(0.01)  # arrival spacing, not synchronisation
        await asyncio.gather(*workers)
        report.seconds = round(time.monotonic() - start, 1)
    report.ttft_ms, report.itl_ms = percentiles(ttft), percentiles(itl)
    report.memory_mb.sort()  # taken concurrently
    if len(report.memory_mb) >= 2:
        unkept = [(n, rss - kept) for n, rss, kept in report.memory_mb]
        report.kib_per_request = round(1024.0 * growth_per_request(unkept), 1)
    return report


def spawn_server(model_dir: str | None, extra: list[str]) -> Subprocess:
    """The server as a process, with its metrics on a free port (server_memory reads them)."""
    server = Subprocess("--port", "0", "--metrics-port", "-1", *(["--model-dir", model_dir] if model_dir else []),
                        *extra)
    try:
        server.wait_serving()
    except BaseException:
        server.kill()  # never left behind
        raise
    return server


def server_memory(server: Subprocess) -> ServerMemory:
    return ServerMemory(server.pid, f"http://127.0.0.1:{server.info['metrics_port']}/metrics")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=None, help="also stop after this many requests")
    parser.add_argument("--model-dir", default=None, help="default: the server's default model")
    parser.add_argument("--max-slots", type=int, default=32)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args()
    server = spawn_server(args.model_dir, ["--max-slots", str(args.max_slots), "--max-queue", "64",
                                           "--max-context", "512"])
    try:
        report = asyncio.run(soak(f"127.0.0.1:{server.port}", server_memory(server), args.streams, args.minutes * 60,
                                  max_requests=args.max_requests))
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(asdict(report), indent=2))
    print(json.dumps({k: v for k, v in asdict(report).items() if k != "memory_mb"}, indent=2))
    print("memory (requests, RSS MB, prefix cache MB):", report.memory_mb[:: max(1, len(report.memory_mb) // 20)])
    return 0 if report.other_errors == 0 and report.memory_flat else 1


if __name__ == "__main__":
    sys.exit(main())
