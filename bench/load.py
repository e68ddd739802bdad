"""Load generator: a separate client process that drives a tokenstream server over real gRPC (grpc.aio).

    python -m bench.load --target 127.0.0.1:PORT --out FILE.json --kind closed --concurrency 8 --new-tokens 128

Kinds:
  closed    `concurrency` workers start together, each sends `requests` requests back to back; aggregate
            tokens/s = all tokens / (last end - first start).
  arrivals  the same, but worker i starts at i * stagger_s and max_new_tokens is jittered by +-jitter, so
            streams end at different times and new requests keep arriving while others decode.
  sequence  one stream at a time, for each entry of --lengths (batch 1), `requests` rounds.
Every request is greedy on one of bench.common's prompt sets, with min_new_tokens = max_new_tokens (unless
--no-exact), so every engine generates the same number of tokens. Timing: tests.support.load.StreamTimer.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

import grpc

from bench.common import CpuMeter, aggregate, arrival_plan, prompt_set, summary, wait_idle, write_json
from tests.support.load import timed_stream
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc


async def one_request(stub: Any, prompts: list[str], index: int, new_tokens: int, timeout_s: float,
                      exact: bool = True) -> dict[str, Any]:
    stopping = pb.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens if exact else 0)
    req = pb.GenerateRequest(prompt=prompts[index % len(prompts)], stopping=stopping)
    timed, final = await timed_stream(stub, req, timeout_s, prompt=index % len(prompts))
    assert final is not None, "stream ended without a final message"
    return {**timed, "finish": pb.FinishReason.Name(final.finish_reason),
            "completion_tokens": final.usage.completion_tokens, "prompt_tokens": final.usage.prompt_tokens,
            "server_ttft_ms": final.timings.time_to_first_token_ms, "server_queue_ms": final.timings.queue_ms}


async def closed_loop(stub: Any, prompts: list[str], plan: list[list[int]], stagger_s: float, timeout_s: float,
                      exact: bool = True) -> list[dict[str, Any]]:
    """Worker w starts at w * stagger_s and sends its plan's requests back to back (prompt w + j)."""
    results: list[dict[str, Any]] = []

    async def worker(w: int, lengths: list[int]) -> None:
        if stagger_s:
            await asyncio.sleep(w * stagger_s)
        for j, n in enumerate(lengths):
            r = await one_request(stub, prompts, w + j, n, timeout_s, exact)
            r["worker"] = w
            results.append(r)

    await asyncio.gather(*(worker(w, lengths) for w, lengths in enumerate(plan)))
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    prompts = prompt_set(args.prompts)
    options = [("grpc.max_receive_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.wait_for(channel.channel_ready(), 30)
        if args.warmup:
            await one_request(stub, prompts, 0, 2, args.timeout)
        if args.kind == "sequence":
            per_length: dict[str, Any] = {}
            for n in args.lengths:
                runs: list[dict[str, Any]] = []
                idle = wait_idle()
                for _ in range(args.requests):
                    runs.append(await one_request(stub, prompts, 0, n, args.timeout, args.exact))
                per_length[str(n)] = {
                    "runs": [{"tokens": r["tokens"], "wall_s": r["end"] - r["start"], "ttft_s": r["ttft_s"],
                              "finish": r["finish"]} for r in runs],
                    "tokens_per_s": [r["tokens"] / (r["end"] - r["start"]) for r in runs], "idle": idle,
                }
            return {"kind": "sequence", "lengths": per_length}
        plan = arrival_plan(args.concurrency, args.requests, args.new_tokens, args.jitter, args.seed)
        idle = wait_idle()
        meter = CpuMeter(args.server_pid)
        results = await closed_loop(stub, prompts, plan, args.stagger_s, args.timeout, args.exact)
        during = meter.stop()
        agg = aggregate(results, args.concurrency, samples=args.kind == "arrivals")
        agg.update(kind=args.kind, concurrency=args.concurrency, new_tokens=args.new_tokens, prompts=args.prompts,
                   requests_per_worker=args.requests, stagger_s=args.stagger_s, jitter=args.jitter, idle=idle,
                   during=during,
                   server_ttft_ms=summary([r["server_ttft_ms"] for r in results]))
        finishes: dict[str, int] = {}
        for r in results:
            finishes[r["finish"]] = finishes.get(r["finish"], 0) + 1
        agg["finishes"] = finishes
        if args.kind == "arrivals":
            loaded = [r for r in results
                      if sum(1 for o in results if o is not r and o["start"] <= r["start"] < o["end"])
                      >= args.concurrency // 2]
            agg["loaded_server_ttft_ms"] = summary([r["server_ttft_ms"] for r in loaded])
        if not args.keep_outputs:
            agg.pop("outputs", None)
        return agg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.load")
    p.add_argument("--target", required=True)
    p.add_argument("--server-pid", type=int, nargs="*", default=[], help="counted as ours by the CPU meter")
    p.add_argument("--out", required=True)
    p.add_argument("--kind", choices=["closed", "arrivals", "sequence"], default="closed")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=1, help="requests per worker (rounds per length for sequence)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", choices=["short", "long"], default="short")
    p.add_argument("--no-exact", dest="exact", action="store_false",
                   help="let end-of-sequence end a stream early (default: min_new_tokens = max_new_tokens)")
    p.add_argument("--lengths", type=int, nargs="*", default=[64])
    p.add_argument("--stagger-s", type=float, default=0.0)
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--warmup", action="store_true")
    p.add_argument("--keep-outputs", action="store_true", help="keep every request's generated token ids")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
