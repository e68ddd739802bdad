"""The load generator's primitives, shared by the soak (tests/soak.py) and the benchmarks (bench/): one way to time
a stream, whatever engine or front produced it, and a timed Generate call over grpc.aio."""

from __future__ import annotations

import time
from typing import Any

from tokenstream.v1 import generation_pb2 as pb


class StreamTimer:
    """Times one streamed request the same way for every engine: TTFT from the call to the first message that
    carries a token; each later message's gap since the previous one, spread over the tokens it carries."""

    def __init__(self, prompt: int = 0) -> None:
        self.prompt = prompt  # index into the caller's prompt set
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.itl: list[float] = []
        self.ids: list[int] = []

    def tokens(self, ids: list[int]) -> None:
        t = time.perf_counter()
        k = len(ids)
        if not k:
            return
        if self.first is None:
            self.first = t
            self.itl.extend([0.0] * (k - 1))
        else:
            self.itl.extend([(t - self.last) / k] * k)
        self.last = t
        self.ids.extend(ids)

    def done(self, **extra: Any) -> dict[str, Any]:
        end = time.perf_counter()
        return {"prompt": self.prompt, "start": self.start, "end": end,
                "ttft_s": None if self.first is None else self.first - self.start, "itl_s": self.itl,
                "tokens": len(self.ids), "ids": self.ids, **extra}


async def timed_stream(stub: Any, req: pb.GenerateRequest, timeout_s: float, prompt: int = 0,
                       **kw: Any) -> tuple[dict[str, Any], pb.GenerateResponse | None]:
    """Stream one request, timing it on the client: (StreamTimer.done(), the final message). RpcErrors propagate."""
    timer = StreamTimer(prompt)
    final = None
    async for msg in stub.Generate(req, timeout=timeout_s, **kw):
        timer.tokens([t.id for t in msg.tokens])
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            final = msg
    return timer.done(), final


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"p50": round(pick(0.50), 3), "p90": round(pick(0.90), 3), "p99": round(pick(0.99), 3),
            "max": round(xs[-1], 3)}
