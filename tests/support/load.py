"""The load generator's one primitive: a timed streaming Generate call over grpc.aio (soak, benchmarks, tests)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from tokenstream.v1 import generation_pb2 as pb


@dataclass
class TimedStream:
    start: float  # perf_counter at the call
    end: float = 0.0
    ttft_s: float | None = None  # to the first message that carries a token
    itl_s: list[float] = field(default_factory=list)  # each message's gap spread over the tokens it carries
    tokens: int = 0
    final: pb.GenerateResponse | None = None

    @property
    def finish(self) -> str:
        return pb.FinishReason.Name(self.final.finish_reason) if self.final is not None else "NONE"


async def timed_stream(stub: Any, req: pb.GenerateRequest, timeout_s: float, **kw: Any) -> TimedStream:
    """Stream one request, timing it on the client; RpcErrors propagate to the caller."""
    out = TimedStream(start=time.perf_counter())
    last = out.start
    async for msg in stub.Generate(req, timeout=timeout_s, **kw):
        now = time.perf_counter()
        k = len(msg.tokens)
        if k:
            if out.ttft_s is None:
                out.ttft_s = now - out.start
                out.itl_s.extend([0.0] * (k - 1))
            else:
                out.itl_s.extend([(now - last) / k] * k)
            last = now
        out.tokens += k
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            out.final = msg
    out.end = time.perf_counter()
    return out


def percentiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {}
    xs = sorted(xs)

    def pick(q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"p50": round(pick(0.50), 3), "p90": round(pick(0.90), 3), "p99": round(pick(0.99), 3),
            "max": round(xs[-1], 3)}
