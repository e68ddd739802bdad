"""Issue #13's lever "attention over the true lengths", measured on SmolLM2-135M (results in bench/PROFILE.md).

    python -m bench.levers.true_lengths                          # layer, check, steps (the PROFILE.md table)
    python -m bench.levers.true_lengths --parts steps --reps 15 --cases mixed8,mixed32

The path before (`padded`, DecoderOptions(true_lengths=False)): every decode row attends over the cache's whole
capacity, a power-of-two bucket above the LONGEST row, with a mask. The lever (`grouped`, the default): the decode
rows split into at most two groups by Attention.decode_groups' cost model, the short rows over their own
longest length rounded up to 32 positions, their keys and values gathered block by block into a compact copy,
the rest over the capacity as before. `gather_any` is the same with the cost model off (gather whenever any
row is shorter than the capacity): variant (a) of the brief, "slice the keys to the longest length", done by
gather, since slicing the time axis makes matmul copy it more slowly (`--parts layer` shows both).

Parts:
  layer   one layer's decode attention alone, random K/V: the masked matmul over the capacity, the same over a
          strided slice k[:, :, :L] (matmul copies it), and over a block gather of the first L positions.
  check   exactness: the largest |logit difference| of `grouped` and `gather_any` against `padded` per case,
          over caches holding prefilled random prompts.
  steps   the whole decode step per path and case, interleaved round by round (A/B on the same host noise):
          median ms, and the median per-round ratios padded / path and first / path, the first path being
          `before@REV`: the decoder and cache the lever was built on (bench/revisions.py), loaded from git.
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
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

from bench.common import engine_model_path  # noqa: E402
from bench.measure import median_ms, step_inputs  # noqa: E402
from bench.revisions import DecodeStep, old_decode_step, old_decoder  # noqa: E402
from service.engine.attention import Attention  # noqa: E402
from service.engine.checkpoints.loader import LoadedModel, load_model  # noqa: E402
from service.engine.decoder import DecoderOptions, LlamaDecoder  # noqa: E402
from service.engine.kv_cache import SlotKVCache  # noqa: E402

MAX_CONTEXT = 2048


class GatherAny(Attention):
    """Variant (a): every row over the longest row's length rounded up to 32, gathered whenever shorter than cap."""

    GATHER_COST = 1.0
    GROUP_COST = 0.0


def case_positions(name: str) -> np.ndarray:
    """Positions [B] written by the step (each row's length is position + 1) for a named case."""
    rng = np.random.default_rng(0)
    kind, b = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
    if kind == "u85_":  # a 20-token prompt + 64 tokens: capacity 128
        return np.full(b, 84, dtype=np.int64)
    if kind == "u140_":  # just above a bucket: capacity 256, the worst waste for uniform rows
        return np.full(b, 139, dtype=np.int64)
    if kind == "mixed":  # one row at ~900 positions (in slot 3, not first), the rest at ~100: capacity 1024
        pos = rng.integers(90, 111, b).astype(np.int64)
        pos[3] = 899
        return pos
    raise ValueError(f"unknown case {name!r}; use u85_B, u140_B or mixedB")


CASES = ["u85_1", "u85_8", "u85_32", "u140_1", "u140_8", "u140_32", "mixed8", "mixed32"]


def filled_cache(model: LoadedModel, positions: np.ndarray, seed: int = 0) -> SlotKVCache:
    """A cache sized as the engine sizes it for these rows (slots and capacity buckets), random K/V in it."""
    cfg = model.config
    b = int(positions.shape[0])
    cache = SlotKVCache(cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, MAX_CONTEXT, "float32")
    cache.ensure(int(positions.max()) + 1, b)
    paddle.seed(seed)
    for i in range(cfg.num_layers):
        for t in cache.layer(i):
            t[:] = paddle.randn(t.shape) * 2.0  # in place: the views write into the cache
    return cache


def prefilled_cache(model: LoadedModel, dec: LlamaDecoder, positions: np.ndarray, seed: int = 1) -> SlotKVCache:
    """A cache sized as the engine sizes it, each slot holding a prefilled random prompt of `position` tokens: the
    K/V the model itself makes (random K/V amplify rounding through 30 layers: ~1e-3 where real ones give ~4e-5)."""
    cfg = model.config
    b = int(positions.shape[0])
    cache = SlotKVCache(cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim, MAX_CONTEXT, "float32")
    cache.ensure(int(positions.max()) + 1, b)
    rng = np.random.default_rng(seed)
    for slot, n in enumerate(positions):
        dec.prefill(cache, slot, rng.integers(4, cfg.vocab_size, int(n)).astype(np.int64), 0, want_logits=False)
    return cache


def decoders(model: LoadedModel) -> dict[str, LlamaDecoder]:
    cfg, w = model.config, model.weights
    gather_any = LlamaDecoder(cfg, w, MAX_CONTEXT, "float32")
    gather_any.attention = GatherAny(cfg)
    return {"padded": LlamaDecoder(cfg, w, MAX_CONTEXT, "float32", options=DecoderOptions(true_lengths=False)),
            "grouped": LlamaDecoder(cfg, w, MAX_CONTEXT, "float32"),
            "gather_any": gather_any}


BEFORE = "true_lengths_base"  # bench/revisions.py: the commit this lever was built on, the 'before' path


def plan_of(dec: LlamaDecoder, cache: SlotKVCache, positions: np.ndarray) -> str:
    groups, _ = dec.attention.decode_groups(cache, positions)
    return " + ".join(f"{int(g.mask.shape[0])}x{int(g.mask.shape[-1])}" + ("" if g.blocks is None else "g")
                      for g in groups)


def layer_fns(b: int, cap: int, span: int) -> dict[str, Callable[[], Any]]:
    """One layer's decode attention on SmolLM2's heads (3 kv heads x 3 queries, d 64), random data, three ways."""
    kv, g, d = 3, 3, 64
    k, v, q = paddle.randn([b, kv, cap, d]), paddle.randn([b, kv, cap, d]), paddle.randn([b, kv, g, d])
    mask, mask_s = paddle.zeros([b, kv, g, cap]), paddle.zeros([b, kv, g, span])
    kb, vb = k.reshape([-1, 32 * d]), v.reshape([-1, 32 * d])  # [b kv cap/32, 32 d]
    blocks = ((np.arange(b)[:, None, None] * kv + np.arange(kv)[None, :, None]) * (cap // 32)
              + np.arange(span // 32)).reshape(-1)
    idx = paddle.to_tensor(blocks.astype(np.int64))

    def attend(kk: paddle.Tensor, vv: paddle.Tensor, m: paddle.Tensor) -> paddle.Tensor:
        return paddle.matmul(F.softmax(paddle.matmul(q, kk, transpose_y=True) + m, -1), vv)

    return {
        "capacity": lambda: attend(k, v, mask),
        "strided slice": lambda: attend(k[:, :, :span], v[:, :, :span], mask_s),
        "block gather": lambda: attend(paddle.gather(kb, idx).reshape([b, kv, span, d]),
                                       paddle.gather(vb, idx).reshape([b, kv, span, d]), mask_s),
        "gather alone": lambda: (paddle.gather(kb, idx), paddle.gather(vb, idx)),
        "slice copy alone": lambda: (k[:, :, :span].contiguous(), v[:, :, :span].contiguous()),
    }


def part_layer(reps: int) -> list[dict[str, Any]]:
    rows = []
    for b, cap, span in ((8, 1024, 128), (32, 1024, 128), (32, 256, 160), (32, 128, 96)):
        fns = layer_fns(b, cap, span)
        ts: dict[str, list[float]] = {n: [] for n in fns}
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for n, fn in fns.items():
                t = time.perf_counter()
                fn()
                ts[n].append(time.perf_counter() - t)
        rows.append({"batch": b, "capacity": cap, "span": span} | {n: median_ms(x) for n, x in ts.items()})
    return rows


def part_check(model: LoadedModel, decs: dict[str, LlamaDecoder], cases: list[str]) -> dict[str, Any]:
    out = {}
    for name in cases:
        pos = case_positions(name)
        tok = step_inputs(model.config, len(pos), 0)[0]
        cache = prefilled_cache(model, decs["padded"], pos)
        ref = decs["padded"].decode_step(cache, tok, pos)
        out[name] = {p: float(np.abs(dec.decode_step(cache, tok, pos) - ref).max())
                     for p, dec in decs.items() if p != "padded"}
        out[name]["logit_max"] = float(np.abs(ref).max())
        out[name]["greedy_agree"] = all(bool((dec.decode_step(cache, tok, pos).argmax(-1) == ref.argmax(-1)).all())
                                        for dec in decs.values())
        del cache
    return out


def part_steps(model: LoadedModel, decs: dict[str, LlamaDecoder], cases: list[str], reps: int,
               before: str | None) -> dict[str, Any]:
    """Interleaved whole steps; `before`: also the decoder and cache as of that git revision (its own cache of the
    same slots and capacity, zeros in it: values do not change the time)."""
    steps: dict[str, DecodeStep] = {}
    if before:
        cfg = model.config
        dec = old_decoder(before, cfg, model.weights, MAX_CONTEXT)
        steps[f"before@{before}"] = old_decode_step(before, cfg, dec, MAX_CONTEXT)
    steps |= {p: dec.decode_step for p, dec in decs.items()}
    setup = {}
    for name in cases:
        pos = case_positions(name)
        setup[name] = (filled_cache(model, pos), step_inputs(model.config, len(pos), 0)[0], pos)
    times: dict[tuple[str, str], list[float]] = {(c, p): [] for c in cases for p in steps}
    for cache, tok, pos in setup.values():  # warm every shape and path
        for fn in steps.values():
            fn(cache, tok, pos)
    loads = [loadavg()]
    for _ in range(reps):  # round-robin: each path and case sees the same stretch of host noise
        for c, (cache, tok, pos) in setup.items():
            for p, fn in steps.items():
                t = time.perf_counter()
                fn(cache, tok, pos).argmax(-1)
                times[(c, p)].append(time.perf_counter() - t)
        loads.append(loadavg())
    rows = []
    first = next(iter(steps))
    for c, (cache, _, pos) in setup.items():
        base, ref = np.array(times[(c, "padded")]), np.array(times[(c, first)])
        for p in steps:
            ts = np.array(times[(c, p)])
            plan = plan_of(decs[p], cache, pos) if p in decs else f"{len(pos)}x{cache.capacity}"
            rows.append({"case": c, "path": p, "batch": len(pos), "capacity": cache.capacity,
                         "plan": plan, "ms_p50": median_ms(list(ts)),
                         "ratio": float(np.median(base / ts)), "vs_first": float(np.median(ref / ts)),
                          "ms_all": [t * 1e3 for t in ts]})
    return {"rows": rows, "loads": loads}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="layer,check,steps")
    ap.add_argument("--cases", default=",".join(CASES), help="u85_B (cap 128), u140_B (cap 256), mixedB (cap 1024)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--before", default=BEFORE, help="the 'before' path: a name in bench/revisions.py or a git "
                    f"revision (default: {BEFORE}, the commit the lever was built on; 'none' to leave it out)")
    ap.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M from its GGUF)")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    parts, cases = args.parts.split(","), args.cases.split(",")
    paddle.set_device("cpu")
    results: dict[str, Any] = {"load_start": loadavg()}
    print(f"load average {loadavg()}")
    with paddle.no_grad():
        if "layer" in parts:
            results["layer"] = rows = part_layer(max(10, args.reps * 3))
            print("one layer's decode attention, ms (median)")
            for r in rows:
                print("  " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
        if "check" in parts or "steps" in parts:
            model = load_model(args.model_dir or engine_model_path("smollm2"))
            decs = decoders(model)
        if "check" in parts:
            results["check"] = chk = part_check(model, decs, cases)
            for c, v in chk.items():
                print(f"check {c:8}: max |logit diff| vs padded: grouped {v['grouped']:.1e}, gather_any "
                      f"{v['gather_any']:.1e} (largest logit {v['logit_max']:.1f}); greedy agree {v['greedy_agree']}")
        if "steps" in parts:
            before = None if args.before == "none" else args.before
            results["steps"] = st = part_steps(model, decs, cases, args.reps, before)
            print(f"whole decode step, {args.reps} interleaved rounds, load {st['loads'][0]}..{st['loads'][-1]}")
            print("case      path              cap  plan                    ms p50  padded/path  first/path")
            for r in st["rows"]:
                print(f"{r['case']:9} {r['path']:16} {r['capacity']:5}  {r['plan']:22} {r['ms_p50']:8.1f} "
                      f"{r['ratio']:8.2f}x {r['vs_first']:10.2f}x")
    results["load_end"] = loadavg()
    print(f"load average at the end {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
