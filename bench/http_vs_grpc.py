"""gRPC versus HTTP/SSE on one server: tokens/s and TTFT at 1 and 8 concurrent streams, alternated in one run.

    python -m bench.http_vs_grpc                       # random-qwen2 (the bench's tiny model), 64 tokens, 5 rounds
    python -m bench.http_vs_grpc --model-dir demo --rounds 7 --new-tokens 128

One server process (`python -m service --http-port ...`) serves both fronts from one engine; this process is the
client of both: grpc.aio for `Generate`, httpx for `POST /v1/completions` with `stream: true` (SSE), the same
prompt, greedy, the same max tokens. Each round runs every (streams, front) cell once, the two fronts back to back
in alternating order, so that drift in the machine's load falls on both alike. Reported: per cell the median over
rounds of the aggregate tokens/s (all tokens / (last end - first start)) and of the TTFT p50 within the round
(client side: from the call to the first message or SSE chunk that carries text), and HTTP / gRPC ratios; beside
them, the engine's own decode rate per stream (server timings) and this client's CPU per token, since on a small
machine the client's CPU is taken from the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.common import PROMPTS, REPO, RESULTS, bench_env, free_port, log, median, write_json
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

FRONTS = ("grpc", "http")


async def grpc_request(stub: Any, prompt: str, n: int) -> dict[str, Any]:
    req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n))
    t0 = time.perf_counter()
    first = None
    tokens = 0
    decode_ms = 0.0
    async for msg in stub.Generate(req, timeout=600):
        if msg.tokens and first is None:
            first = time.perf_counter()
        tokens += len(msg.tokens)
        decode_ms = msg.timings.decode_ms or decode_ms
    return {"start": t0, "end": time.perf_counter(), "ttft_s": None if first is None else first - t0,
            "tokens": tokens, "server_decode_ms": decode_ms}


async def http_request(http: httpx.AsyncClient, prompt: str, n: int) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    tokens = 0
    decode_ms = 0.0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if first is None and obj["choices"] and obj["choices"][0]["text"]:
                first = time.perf_counter()
            if obj.get("usage"):
                tokens = obj["usage"]["completion_tokens"]
            if obj["choices"] and "tokenstream" in obj["choices"][0]:
                decode_ms = obj["choices"][0]["tokenstream"]["timings"]["decode_ms"]
    return {"start": t0, "end": time.perf_counter(), "ttft_s": None if first is None else first - t0,
            "tokens": tokens, "server_decode_ms": decode_ms}


async def cell(front: str, streams: int, n: int, stub: Any, http: httpx.AsyncClient) -> dict[str, Any]:
    """`streams` requests started together on one front; aggregate tokens/s and the TTFT p50 of the cell."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(streams)]
    cpu0 = time.process_time()  # this client process's CPU, all threads (gRPC's C-core ones included)
    if front == "grpc":
        results = await asyncio.gather(*(grpc_request(stub, p, n) for p in prompts))
    else:
        results = await asyncio.gather(*(http_request(http, p, n) for p in prompts))
    cpu_s = time.process_time() - cpu0
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttfts = [r["ttft_s"] * 1e3 for r in results if r["ttft_s"] is not None]
    # The engine's own decode rate per stream (server timings): whether a front slows the engine down, or only
    # what reaches the client.
    decode = [(r["tokens"] - 1) / (r["server_decode_ms"] / 1e3) for r in results if r["server_decode_ms"] > 0]
    return {"tokens": tokens, "per_request_tokens": [r["tokens"] for r in results],
            "tokens_per_s": tokens / (end - start), "ttft_ms_p50": median(ttfts), "ttft_ms": ttfts,
            "server_decode_tokens_per_s_p50": median(decode), "client_cpu_ms_per_token": cpu_s * 1e3 / tokens}


async def measure(grpc_target: str, http_base: str, streams: list[int], rounds: int, n: int) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(streams) * 2, max_keepalive_connections=max(streams) * 2)
    async with grpc.aio.insecure_channel(grpc_target) as channel, \
            httpx.AsyncClient(base_url=http_base, limits=limits, timeout=600) as http:
        stub = pb_grpc.GenerationServiceStub(channel)
        for front in FRONTS:  # warm-up: connections, the first request's one-off costs
            await cell(front, max(streams), 4, stub, http)
        cells: dict[str, list[dict[str, Any]]] = {f"{front}@{s}": [] for s in streams for front in FRONTS}
        for r in range(rounds):
            for s in streams:
                order = FRONTS if (r + s) % 2 == 0 else FRONTS[::-1]
                for front in order:
                    result = await cell(front, s, n, stub, http)
                    cells[f"{front}@{s}"].append(result)
                    log(f"round {r + 1}/{rounds} {front:4} x{s}: {result['tokens_per_s']:7.1f} tok/s, "
                        f"TTFT p50 {result['ttft_ms_p50']:6.1f} ms")
    summary: dict[str, Any] = {}
    for s in streams:
        row: dict[str, Any] = {}
        for front in FRONTS:
            runs = cells[f"{front}@{s}"]
            row[front] = {"tokens_per_s": median([x["tokens_per_s"] for x in runs]),
                          "ttft_ms_p50": median([x["ttft_ms_p50"] for x in runs]),
                          "server_decode_tokens_per_s": median([x["server_decode_tokens_per_s_p50"] for x in runs]),
                          "client_cpu_ms_per_token": median([x["client_cpu_ms_per_token"] for x in runs]),
                          "tokens_per_round": runs[0]["tokens"]}
        row["http_over_grpc_tokens_per_s"] = row["http"]["tokens_per_s"] / row["grpc"]["tokens_per_s"]
        row["http_over_grpc_ttft"] = row["http"]["ttft_ms_p50"] / row["grpc"]["ttft_ms_p50"]
        same = cells[f"grpc@{s}"][0]["per_request_tokens"] == cells[f"http@{s}"][0]["per_request_tokens"]
        row["same_tokens_on_both_fronts"] = same  # greedy, same prompts: the work must be identical
        summary[str(s)] = row
    return {"summary": summary, "cells": cells}


def serve(model: str, log_path: Path) -> tuple[subprocess.Popen[bytes], int, int]:
    port, http_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--http-port",
           str(http_port), "--model-dir", model, "--max-slots", "32", "--max-context", "2048", "--grace-s", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for msg in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=600,
                                                         wait_for_ready=True):
            if msg.status == health_pb2.HealthCheckResponse.SERVING:
                break
    return proc, port, http_port


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.http_vs_grpc", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="random-qwen2",
                   help="a registered model (random-qwen2: the bench's tiny 41.8M model; demo) or a path")
    p.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}-http-vs-grpc.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    proc, port, http_port = serve(args.model_dir, out.with_suffix(".server.log"))
    try:
        result = asyncio.run(measure(f"127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", args.streams,
                                     args.rounds, args.new_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    result.update(model=args.model_dir, rounds=args.rounds, new_tokens=args.new_tokens, loadavg_start=load,
                  loadavg_end=os.getloadavg(), cpus=os.cpu_count())
    write_json(out, result)
    print(f"\nHTTP/SSE vs gRPC, {args.model_dir} model, {args.new_tokens} tokens, greedy, medians of {args.rounds} "
          f"alternated rounds (load average at start {load[0]:.2f}, end {result['loadavg_end'][0]:.2f})")
    print(f"{'streams':>7} | {'gRPC tok/s':>10} {'HTTP tok/s':>10} {'ratio':>6} | "
          f"{'gRPC TTFT':>9} {'HTTP TTFT':>9} {'ratio':>6} | engine tok/s per stream, gRPC / HTTP | "
          "client CPU ms/token, gRPC / HTTP")
    for s, row in result["summary"].items():
        g, h = row["grpc"], row["http"]
        warn = "" if row["same_tokens_on_both_fronts"] else "  (token counts differ!)"
        print(f"{s:>7} | {g['tokens_per_s']:10.1f} {h['tokens_per_s']:10.1f} "
              f"{row['http_over_grpc_tokens_per_s']:6.3f} | {g['ttft_ms_p50']:7.1f}ms {h['ttft_ms_p50']:7.1f}ms "
              f"{row['http_over_grpc_ttft']:6.3f} | {g['server_decode_tokens_per_s']:14.1f} / "
              f"{h['server_decode_tokens_per_s']:.1f} | {g['client_cpu_ms_per_token']:10.3f} / "
              f"{h['client_cpu_ms_per_token']:.3f}{warn}")
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
