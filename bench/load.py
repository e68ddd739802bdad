"""Load generator: a separate client process that drives a tokenstream server over real gRPC (grpc.aio).

    python -m bench.load --target 127.0.0.1:PORT --out FILE.json --kind closed --concurrency 8 --new-tokens 64

Kinds:
  closed    `concurrency` workers start together, each sends `requests` requests back to back; aggregate
            tokens/s = all tokens / (last end - first start).
  arrivals  the same, but worker i starts at i * stagger_s and max_new_tokens is jittered by +-jitter, so
            streams end at different times and new requests keep arriving while others decode.
  sequence  one stream at a time, for each entry of --lengths (batch 1), `requests` rounds.
Every request is greedy on one of bench.common.PROMPTS. Client-side TTFT is the time from the call to the first
message that carries a token; inter-token latency spreads each message's gap over the tokens it carries.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import grpc

from bench.common import PROMPTS, summary, write_json
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc


async def one_request(stub: Any, prompt: str, new_tokens: int, timeout_s: float) -> dict[str, Any]:
    req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    first = None
    last = t0
    itl: list[float] = []
    tokens = 0
    final = None
    async for msg in stub.Generate(req, timeout=timeout_s):
        t = time.perf_counter()
        k = len(msg.tokens)
        if k:
            if first is None:
                first = t
                if k > 1:
                    itl.extend([0.0] * (k - 1))
            else:
                itl.extend([(t - last) / k] * k)
            last = t
        tokens += k
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            final = msg
    t1 = time.perf_counter()
    assert final is not None, "stream ended without a final message"
    return {
        "start": t0, "end": t1, "ttft_s": (first - t0) if first is not None else None, "itl_s": itl,
        "tokens": tokens, "completion_tokens": final.usage.completion_tokens,
        "prompt_tokens": final.usage.prompt_tokens,
        "finish": pb.FinishReason.Name(final.finish_reason),
        "server_ttft_ms": final.timings.time_to_first_token_ms, "server_queue_ms": final.timings.queue_ms,
    }


async def worker(stub: Any, wid: int, delay: float, plan: list[int], timeout_s: float,
                 out: list[dict[str, Any]]) -> None:
    if delay:
        await asyncio.sleep(delay)
    for j, n in enumerate(plan):
        r = await one_request(stub, PROMPTS[(wid + j) % len(PROMPTS)], n, timeout_s)
        r["worker"] = wid
        out.append(r)


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    if not results:
        return {"requests": 0}
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl_s"]]
    finishes: dict[str, int] = {}
    for r in results:
        finishes[r["finish"]] = finishes.get(r["finish"], 0) + 1
    per_req_tps = [r["tokens"] / (r["end"] - r["start"]) for r in results if r["end"] > r["start"]]
    return {
        "requests": len(results), "tokens": tokens, "wall_s": end - start,
        "tokens_per_s": tokens / (end - start) if end > start else None,
        "ttft_ms": summary([r["ttft_s"] * 1e3 for r in results if r["ttft_s"] is not None]),
        "server_ttft_ms": summary([r["server_ttft_ms"] for r in results]),
        "itl_ms": summary([x * 1e3 for x in itl]),
        "per_request_tokens_per_s": summary(per_req_tps),
        "finishes": finishes,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    options = [("grpc.max_receive_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        if args.warmup:
            await one_request(stub, PROMPTS[0], 2, args.timeout)
        results: list[dict[str, Any]] = []
        if args.kind == "sequence":
            per_length: dict[str, Any] = {}
            for n in args.lengths:
                runs: list[dict[str, Any]] = []
                for _ in range(args.requests):
                    runs.append(await one_request(stub, PROMPTS[0], n, args.timeout))
                per_length[str(n)] = {
                    "runs": [{"tokens": r["tokens"], "wall_s": r["end"] - r["start"], "ttft_s": r["ttft_s"],
                              "finish": r["finish"]} for r in runs],
                    "tokens_per_s": [r["tokens"] / (r["end"] - r["start"]) for r in runs],
                }
            return {"kind": "sequence", "lengths": per_length}
        tasks = []
        for w in range(args.concurrency):
            plan = []
            for _ in range(args.requests):
                n = args.new_tokens
                if args.jitter:
                    n = max(1, round(n * (1 + rng.uniform(-args.jitter, args.jitter))))
                plan.append(n)
            tasks.append(worker(stub, w, w * args.stagger_s, plan, args.timeout, results))
        await asyncio.gather(*tasks)
        agg = aggregate(results)
        agg.update(kind=args.kind, concurrency=args.concurrency, new_tokens=args.new_tokens,
                   requests_per_worker=args.requests, stagger_s=args.stagger_s, jitter=args.jitter)
        if args.kind == "arrivals":
            # "Under load": requests that arrived while at least half of the other streams were decoding.
            def others_active(r: dict[str, Any]) -> int:
                return sum(1 for o in results if o is not r and o["start"] <= r["start"] < o["end"])

            loaded = [r for r in results if others_active(r) >= args.concurrency // 2]
            agg["loaded_ttft_ms"] = summary([r["ttft_s"] * 1e3 for r in loaded if r["ttft_s"] is not None])
            agg["loaded_server_ttft_ms"] = summary([r["server_ttft_ms"] for r in loaded])
        if args.keep_requests:
            agg["request_list"] = [{k: v for k, v in r.items() if k != "itl_s"} for r in results]
        return agg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.load")
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["closed", "arrivals", "sequence"], default="closed")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=1, help="requests per worker (rounds per length for sequence)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--lengths", type=int, nargs="*", default=[64])
    p.add_argument("--stagger-s", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--keep-requests", action="store_true")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
