"""The decode step with the fused kernels and with the plain ones, on SmolLM2-135M (issue: "It dies at start on a
CPU without AVX-512"). Results in bench/PROFILE.md.

    python -m bench.levers.kernels [--batches 1,8,32] [--length 128] [--reps 15] [--json FILE]

Paths, timed round by round (each round runs every path once per batch size, so host noise falls on all alike):
  fused       the one-forward step with the kernels this CPU proved in a child process (service/engine/kernels.py);
              absent where none runs (an AVX2-only CPU)
  plain       the same step with the plain RMSNorm and SwiGLU: what an AVX2-only CPU runs now
  plain_path  decode_step_plain, the op-by-op forward that an AVX2-only CPU ran before (~48 ops per layer)
Prints the median step per path and batch, and the median per-round ratio against `plain`.
"""

from __future__ import annotations

import os

from bench.host import loadavg, mkl_for_amd

mkl_for_amd()  # MKL's AVX2 kernels on AMD, as the server sets them; before the first Paddle import
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from bench.common import engine_model_path, quiet  # noqa: E402
from bench.measure import make_cache, step_inputs  # noqa: E402
from service.engine.checkpoints.loader import load_model  # noqa: E402
from service.engine.decoder import LlamaDecoder  # noqa: E402
from service.engine.kernels import PLAIN, Kernels, choose, cpu_flags  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--length", type=int, default=128, help="positions already in each row's cache")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M from its GGUF)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    quiet()
    batches = [int(b) for b in args.batches.split(",")]
    model = load_model(args.model_dir or engine_model_path("smollm2"))
    cfg, w = model.config, model.weights
    choices = choose("auto")
    fused = Kernels.from_choices(choices)
    decs = {"plain": LlamaDecoder(cfg, w, 2048, "float32", kernels=PLAIN)}
    if fused != PLAIN:
        decs["fused"] = LlamaDecoder(cfg, w, 2048, "float32", kernels=fused)
    steps: dict[str, Callable[..., np.ndarray]] = {name: d.decode_step for name, d in decs.items()}
    steps["plain_path"] = decs["plain"].decode_step_plain
    cache = make_cache(cfg, max(batches), args.length)
    times: dict[tuple[str, int], list[float]] = {(p, b): [] for p in steps for b in batches}

    def once(path: str, b: int) -> float:
        toks, pos = step_inputs(cfg, b, args.length)
        t = time.perf_counter()
        steps[path](cache, toks, pos).argmax(-1)
        return time.perf_counter() - t

    with paddle.no_grad():
        for path, b in times:
            once(path, b), once(path, b)  # warm every shape
        for _ in range(args.reps):
            for (path, b), ts in times.items():
                ts.append(once(path, b))
    avx512 = "avx512f" in cpu_flags()
    print(f"CPU: {'AVX-512' if avx512 else 'no AVX-512'}; kernels: "
          + ", ".join(f"{c.name} {'fused' if c.fused else 'plain'}" for c in choices.values())
          + f"; load {loadavg()}")
    rows = []
    print(f"{'path':12s} " + " ".join(f"{'B' + str(b) + ' ms':>10s} {'vs plain':>8s}" for b in batches))
    for path in steps:
        cells = []
        for b in batches:
            ms = float(np.median(times[path, b])) * 1e3
            ratio = float(np.median(np.array(times["plain", b]) / np.array(times[path, b])))
            rows.append({"path": path, "batch": b, "step_ms_p50": ms, "speedup_vs_plain_p50": ratio,
                         "step_ms_all": [t * 1e3 for t in times[path, b]]})
            cells.append(f"{ms:10.1f} {ratio:7.2f}x")
        print(f"{path:12s} " + " ".join(cells))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"avx512": avx512, "kernels": {c.name: c.fused for c in choices.values()},
                       "length": args.length, "reps": args.reps, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
