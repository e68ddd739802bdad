"""Structured output's cost (issue: "Structured output ... without slowing the batch"): the decode step of a batch
with 0, 1 and all rows constrained by a JSON schema, and the time to compile a typical schema.

    python -m bench.levers.constrained [--batch 8] [--length 128] [--reps 30] [--model-dir DIR] [--json FILE]

Each timed step is what the engine does (scheduler._step / _sample_rows): start the constrained rows' masks on the
mask worker, run the forward, take each row's token (one argmax over the batch for the unconstrained rows; the
float64 row, the mask and its argmax for a constrained one) and advance the matchers. Paths run round by round, so
host noise falls on all alike. Prints the median step per path and its ratio to the unconstrained step
(goal: all rows constrained <= 1.1x), and the median compile time of the schema (goal: < 50 ms).
"""

from __future__ import annotations

import os

from bench.host import loadavg, mkl_for_amd

mkl_for_amd()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from bench.common import engine_model_path, quiet  # noqa: E402
from bench.measure import make_cache, step_inputs  # noqa: E402
from service.engine.checkpoints.loader import load_model  # noqa: E402
from service.engine.constraints import MaskBatch, apply_mask, compile_constraint, ll_tokenizer  # noqa: E402
from service.engine.decoder import LlamaDecoder  # noqa: E402

TYPICAL = {  # an order: nested objects, an array with bounds, enums, ranges, a pattern, optional fields
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                      "email": {"type": "string"}},
                     "required": ["name"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 20, "items": {
            "type": "object", "properties": {"sku": {"type": "string"},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 100},
                                             "price": {"type": "number", "minimum": 0}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
        "notes": {"type": "string"},
    },
    "required": ["id", "customer", "items", "status"],
    "additionalProperties": False,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, what in [("--batch", 8, "rows in the step"), ("--length", 128, "positions in each row's cache"),
                                ("--reps", 30, "timed rounds")]:
        ap.add_argument(flag, type=int, default=default, help=what)
    ap.add_argument("--model-dir", help="checkpoint (default: SmolLM2-135M from its GGUF)")
    ap.add_argument("--json", "--out", dest="json", help="write the figures here (--out: as bench.run names it)")
    args = ap.parse_args(argv)
    quiet()
    model = load_model(args.model_dir or engine_model_path("smollm2"))
    cfg, b, vocab = model.config, args.batch, model.config.vocab_size
    t = time.perf_counter()
    llt = ll_tokenizer(model.tokenizer, vocab, cfg.eos_token_ids)
    tokenizer_s = time.perf_counter() - t
    compile_ms = []
    for _ in range(max(3, args.reps // 3)):
        t = time.perf_counter()
        compiled = compile_constraint("json_schema", TYPICAL, llt)
        compile_ms.append((time.perf_counter() - t) * 1e3)
    dec = LlamaDecoder(cfg, model.weights, 2048, "float32")
    cache = make_cache(cfg, b, args.length)
    toks, pos = step_inputs(cfg, b, args.length)
    paths = {"0 constrained": 0, "1 constrained": 1, f"{b} constrained": b}
    matchers: dict[str, list[Any]] = {p: [compiled.start() for _ in range(k)] for p, k in paths.items()}
    eos = frozenset(cfg.eos_token_ids)

    def once(path: str) -> float:
        ms = matchers[path] + [None] * (b - len(matchers[path]))
        t = time.perf_counter()
        masks = MaskBatch(ms, vocab).start()
        logits = dec.decode_step(cache, toks, pos)
        greedy = logits.argmax(-1)
        for i, mask in enumerate(masks.masks()):
            if mask is None:
                int(greedy[i])
                continue
            row = logits[i].astype(np.float64)
            apply_mask(row, mask)
            token = int(np.argmax(row))
            if token in eos or not ms[i].consume_token(token) or ms[i].is_stopped():
                ms[i].reset()  # start the object again: the walk goes on through the whole grammar
        return time.perf_counter() - t

    times: dict[str, list[float]] = {p: [] for p in paths}
    with paddle.no_grad():
        for p in paths:
            once(p), once(p)
        for _ in range(args.reps):
            for p, ts in times.items():
                ts.append(once(p))
    base = np.array(times["0 constrained"])
    print(f"model {model.name}, batch {b}, {args.length} cached positions, {args.reps} rounds; load {loadavg()}")
    print(f"llguidance tokenizer built in {tokenizer_s * 1e3:.0f} ms (once per model); typical schema compiled in "
          f"{float(np.median(compile_ms)):.2f} ms (median of {len(compile_ms)})")
    rows = []
    for p, k in paths.items():
        ms = float(np.median(times[p])) * 1e3
        ratio = float(np.median(np.array(times[p]) / base))
        rows.append({"path": p, "constrained_rows": k, "step_ms_p50": ms, "ratio_vs_unconstrained_p50": ratio,
                     "step_ms_all": [x * 1e3 for x in times[p]]})
        print(f"{p:16s} {ms:9.2f} ms/step  {ratio:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model.name, "batch": b, "length": args.length, "reps": args.reps,
                       "tokenizer_ms": tokenizer_s * 1e3, "compile_ms_p50": float(np.median(compile_ms)),
                       "compile_ms_all": compile_ms, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
