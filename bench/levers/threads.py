"""The two-core question: the decode step's matmuls on one thread or on two (issue "Speed: use both cores").

    python -m bench.levers.threads [--rows 1,8,32] [--pairs 7] [--json FILE]

For each row count, one layer stack's projections at SmolLM2-135M's shapes (30 layers of qkv [576, 960],
o [576, 576], gate and up [576, 1536], down [1536, 576], each layer its own weights, so they stream from memory as
in a decode step) and the lm_head (x @ E^T against the tied [49152, 576] embedding), timed by variants:
  paddle1      Paddle's matmul, one MKL/OpenMP thread (the engine's default)
  paddle2      the same with two (paddle.base.core.set_num_threads(2))
  split2       one thread each, every weight split by output columns across two Python worker threads (Paddle
               releases the GIL), the halves concatenated
  numpy1       numpy's BLAS on one thread (threadpoolctl); numpy2 on two
Pairs are interleaved: each pair times a 1-thread variant and its 2-thread counterpart back to back, and records
the share of the machine others used meanwhile (/proc/stat less this process's CPU time). Only pairs where the other
core was at least 90 % idle count ("quiet"); the medians and per-pair ratios printed are over quiet pairs only.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.host import cpu_name, loadavg, mkl_for_amd

mkl_for_amd()

import numpy as np  # noqa: E402
import paddle  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

H, FFN, QKV, V, LAYERS = 576, 1536, 960, 49152, 30
PAIRS = (("paddle1", "paddle2"), ("paddle1", "split2"), ("numpy1", "numpy2"))
QUIET = 0.9  # the other core's idle share a pair needs to count


def _cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, in seconds."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def _own() -> float:
    t = os.times()
    return t.user + t.system


class Stack:
    """One step's weights: per layer (in, out) matrices, and the lm_head's embedding."""

    def __init__(self, rng: np.random.Generator) -> None:
        shapes = [(H, QKV), (H, H), (H, FFN), (H, FFN), (FFN, H)]
        self.np = [[(rng.standard_normal(s) * 0.02).astype(np.float32) for s in shapes] for _ in range(LAYERS)]
        self.embed_np = (rng.standard_normal((V, H)) * 0.02).astype(np.float32)
        self.pd = [[paddle.to_tensor(w) for w in layer] for layer in self.np]
        self.embed = paddle.to_tensor(self.embed_np)
        # Column halves for split2, made once (as the engine would hold them).
        self.halves = [[(paddle.to_tensor(np.ascontiguousarray(w[:, : w.shape[1] // 2])),
                         paddle.to_tensor(np.ascontiguousarray(w[:, w.shape[1] // 2:]))) for w in layer]
                       for layer in self.np]
        self.embed_halves = (self.embed[: V // 2], self.embed[V // 2:])

    def paddle_step(self, x: paddle.Tensor) -> None:
        xi = paddle.ones([x.shape[0], FFN])  # the down projection's input [rows, I]
        for layer in self.pd:
            for w in layer:
                paddle.matmul(x if w.shape[0] == H else xi, w)
        paddle.matmul(x, self.embed, transpose_y=True).numpy()

    def numpy_step(self, x: np.ndarray) -> None:
        xi = np.ones((x.shape[0], FFN), dtype=np.float32)
        for layer in self.np:
            for w in layer:
                (x if w.shape[0] == H else xi) @ w
        x @ self.embed_np.T

    def split_step(self, x: paddle.Tensor, pool: ThreadPoolExecutor) -> None:
        xi = paddle.ones([x.shape[0], FFN])
        for layer in self.halves:
            for a, b in layer:
                inp = x if a.shape[0] == H else xi
                fa = pool.submit(paddle.matmul, inp, a)
                out_b = paddle.matmul(inp, b)
                paddle.concat([fa.result(), out_b], axis=-1)
        ea, eb = self.embed_halves
        fa = pool.submit(paddle.matmul, x, ea, False, True)
        out_b = paddle.matmul(x, eb, transpose_y=True)
        paddle.concat([fa.result(), out_b], axis=-1).numpy()


def variants(stack: Stack, rows: int, pool: ThreadPoolExecutor) -> dict[str, Callable[[], None]]:
    x = paddle.to_tensor(np.random.default_rng(rows).standard_normal((rows, H)).astype(np.float32))
    xn = x.numpy()

    def threads(n: int, fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            paddle.base.core.set_num_threads(n)
            with threadpool_limits(n):
                fn()
            paddle.base.core.set_num_threads(1)
        return run

    return {
        "paddle1": threads(1, lambda: stack.paddle_step(x)),
        "paddle2": threads(2, lambda: stack.paddle_step(x)),
        "split2": threads(1, lambda: stack.split_step(x, pool)),
        "numpy1": threads(1, lambda: stack.numpy_step(xn)),
        "numpy2": threads(2, lambda: stack.numpy_step(xn)),
    }


def timed_pair(fns: dict[str, Callable[[], None]], a: str, b: str) -> dict[str, Any]:
    """Time a then b, and how much of the machine others used meanwhile."""
    busy0, total0 = _cpu()
    own0 = _own()
    out: dict[str, Any] = {}
    for name in (a, b):
        t = time.perf_counter()
        fns[name]()
        out[name] = time.perf_counter() - t
    busy1, total1 = _cpu()
    ncpu = os.cpu_count() or 1
    wall = (total1 - total0) / ncpu  # seconds of wall time, from the jiffies of all cores
    others = max(0.0, (busy1 - busy0) - (_own() - own0))
    out["other_core_idle"] = 1.0 - others / wall if wall > 0 else None  # one core's worth of others' use
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--pairs", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    stack = Stack(np.random.default_rng(0))
    results: dict[str, Any] = {"cpu": cpu_name(), "load_start": loadavg(), "quiet_threshold": QUIET, "rows": {}}
    print(f"{cpu_name()}; load {loadavg()}; {args.pairs} interleaved pairs per row count and comparison")
    with ThreadPoolExecutor(1) as pool:
        for rows in (int(r) for r in args.rows.split(",")):
            fns = variants(stack, rows, pool)
            for fn in fns.values():
                fn()  # warm
            pairs: dict[str, list[dict[str, Any]]] = {f"{a}/{b}": [] for a, b in PAIRS}
            for _ in range(args.pairs):
                for a, b in PAIRS:
                    pairs[f"{a}/{b}"].append(timed_pair(fns, a, b))
            results["rows"][rows] = pairs
            for key, runs in pairs.items():
                a, b = key.split("/")
                quiet = [r for r in runs if (r["other_core_idle"] or 0) >= QUIET]
                if not quiet:
                    idle = ", ".join(f"{r['other_core_idle']:.2f}" for r in runs)
                    print(f"rows {rows:3d} {key:16s} no quiet pair (other core idle: {idle})")
                    continue
                ms_a = float(np.median([r[a] for r in quiet])) * 1e3
                ms_b = float(np.median([r[b] for r in quiet])) * 1e3
                ratio = float(np.median([r[a] / r[b] for r in quiet]))
                print(f"rows {rows:3d} {key:16s} {a} {ms_a:7.1f} ms  {b} {ms_b:7.1f} ms  {b} speed-up "
                      f"{ratio:5.2f}x  ({len(quiet)}/{len(runs)} pairs quiet)")
    results["load_end"] = loadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
