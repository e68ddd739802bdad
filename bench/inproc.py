"""In-process measurements on the real Engine (no gRPC), in their own process.

    python -m bench.inproc --model-dir DIR --out FILE.json --parts sweep,steps,profile,gil [--target HOST:PORT]

Parts:
  sweep      at each concurrency, N streams started together on Engine.generate in this process, and the same N
             streams over gRPC to the server (a separate process; this process is the client, its engine idle),
             alternated round by round, with an idle check before each timing: aggregate tokens/s, TTFT, ITL,
             and the gRPC / in-process ratio per round.
  steps      LlamaDecoder.decode_step alone at each batch size at a fixed cache length, the Engine's full
             iteration at batch 8 and 32 (sampling, detokenizing, delivery included), and the memory bandwidth
             (STREAM copy, and a two-thread GEMV that reads a 256 MB matrix the way a decode step reads weights).
  profile    cProfile of decode_step at batch 8 and 32: where a step's time goes.
  gil        an asyncio loop with a 1 ms probe task while the Engine decodes 8 streams on the same loop;
             probe lateness at sys.setswitchinterval 5 ms (Python's default) and 1 ms (the server's default).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import PROMPTS, CpuMeter, aggregate, median, quiet, summary, wait_idle, write_json

quiet()

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from service.engine.api import EngineConfig  # noqa: E402
from service.engine.checkpoints.loader import LoadedModel, load_model  # noqa: E402
from service.engine.kv_cache import SlotKVCache  # noqa: E402
from service.engine.scheduler import Engine  # noqa: E402
from service.engine.types import GenerationRequest  # noqa: E402
from tests.support.load import StreamTimer  # noqa: E402


def make_engine(model: LoadedModel, max_slots: int, max_context: int) -> Engine:
    eng = Engine(model, EngineConfig(max_slots=max_slots, max_context=max_context))
    eng.start(warmup=True)
    return eng


def prompt_ids(model: LoadedModel, i: int = 0) -> list[int]:
    return model.tokenizer.encode(PROMPTS[i % len(PROMPTS)])


# -- sweep: in-process against gRPC ----------------------------------------------------------------


async def inproc_request(eng: Engine, prompts: list[list[int]], index: int, n: int) -> dict[str, Any]:
    req = GenerationRequest(prompt_ids=prompts[index % len(prompts)], max_new_tokens=n, min_new_tokens=n)
    timer = StreamTimer(index % len(prompts))
    async for chunk in eng.generate(req):
        timer.tokens([t.id for t in chunk.tokens])
    return timer.done()


def representative(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the median throughput (its TTFT/ITL go in the table), with every round's figures beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"] or 0)
    rep = dict(ordered[(len(ordered) - 1) // 2])
    rep["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    rep["rounds_idle"] = [r["idle"] for r in runs]
    rep["rounds_during"] = [r["during"] for r in runs]
    rep["outputs"] = runs[0].get("outputs", [])
    return rep


def part_sweep(model: LoadedModel, eng: Engine, target: str, batches: list[int], n: int, rounds: int,
               ratio_rounds: int, server_pids: list[int], ratio_batches: tuple[int, ...] = (1, 8)) -> dict[str, Any]:
    import grpc

    from bench.load import closed_loop
    from tokenstream.v1 import generation_pb2_grpc as pb_grpc

    ids = [model.tokenizer.encode(p) for p in PROMPTS]  # what the server makes of the same prompt text

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {"new_tokens": n, "prompt_tokens": [len(x) for x in ids]}
        async with grpc.aio.insecure_channel(target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 30)
            stub = pb_grpc.GenerationServiceStub(channel)
            await closed_loop(stub, PROMPTS, [[2]], 0, 300)  # warm the channel and the server
            await inproc_request(eng, ids, 0, 2)
            for b in batches:
                runs: dict[str, list[dict[str, Any]]] = {"inproc": [], "grpc": []}
                for k in range(ratio_rounds if b in ratio_batches else rounds):
                    for side in (("inproc", "grpc") if k % 2 == 0 else ("grpc", "inproc")):
                        idle = wait_idle()  # blocks the loop: nothing else runs on it now
                        meter = CpuMeter(server_pids)
                        if side == "inproc":
                            res = await asyncio.gather(*(inproc_request(eng, ids, i, n) for i in range(b)))
                        else:
                            res = await closed_loop(stub, PROMPTS, [[n]] * b, 0, 600)
                        agg = aggregate(list(res), b)
                        agg["idle"], agg["during"] = idle, meter.stop()
                        if k:
                            agg.pop("outputs")
                        runs[side].append(agg)
                ratios = [g["tokens_per_s"] / i["tokens_per_s"]
                          for i, g in zip(runs["inproc"], runs["grpc"], strict=True)]
                out[str(b)] = {"inproc": representative(runs["inproc"]), "grpc": representative(runs["grpc"]),
                               "round_ratios": ratios, "grpc_over_inproc": median(ratios)}
        return out

    return asyncio.run(run())


# -- steps, bandwidth ------------------------------------------------------------------------------


def copy_bandwidth(mb: int = 256, reps: int = 5) -> dict[str, Any]:
    """The best of a STREAM copy (2 x bytes / time: a copy reads and writes every byte), a sum and a GEMV read."""
    n = mb * (1 << 20) // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        ts.append(time.perf_counter() - t)
    np_bw = 2 * src.nbytes / min(ts)
    np_bw_med = 2 * src.nbytes / float(np.median(ts))
    x = paddle.ones([n], dtype="float32")
    y = paddle.assign(x)
    pts = []
    for _ in range(reps):
        t = time.perf_counter()
        paddle.assign(x, output=y)
        float(y[-1])
        pts.append(time.perf_counter() - t)
    pd_bw = 2 * src.nbytes / min(pts)
    # Read-only bandwidth: a sum over the array (what a decode step's weight reads look like).
    rts = []
    for _ in range(reps):
        t = time.perf_counter()
        float(src.sum(dtype=np.float32))
        rts.append(time.perf_counter() - t)
    a = paddle.randn([1024, 1024], dtype="float32")
    an = a.numpy()
    gemm_p, gemm_n = [], []
    for _ in range(reps):
        t = time.perf_counter()
        paddle.matmul(a, a).numpy()
        gemm_p.append(time.perf_counter() - t)
        t = time.perf_counter()
        an @ an
        gemm_n.append(time.perf_counter() - t)
    flop = 2 * 1024**3
    # GEMV over a 256 MB matrix: every byte read once, on all of BLAS's threads, as a batch-1 decode step reads
    # its weights. This is the practical read bandwidth a decoder can reach; a single-thread sum is not.
    w = src.reshape(-1, 1024)
    v = np.ones(1024, dtype=np.float32)
    w @ v
    gemv = []
    for _ in range(reps):
        t = time.perf_counter()
        w @ v
        gemv.append(time.perf_counter() - t)
    gemv_bw = src.nbytes / min(gemv)
    return {"paddle_gemm1024_GFLOPS": flop / min(gemm_p) / 1e9, "numpy_gemm1024_GFLOPS": flop / min(gemm_n) / 1e9,
            "array_mb": mb, "numpy_copy_GBps_best": np_bw / 1e9, "numpy_copy_GBps_median": np_bw_med / 1e9,
            "paddle_copy_GBps_best": pd_bw / 1e9, "numpy_read_GBps_best": src.nbytes / min(rts) / 1e9,
            "gemv_read_GBps_best": gemv_bw / 1e9,
            "bound_GBps": max(np_bw, pd_bw, gemv_bw, src.nbytes / min(rts)) / 1e9}


def weight_bytes(model: LoadedModel) -> dict[str, int]:
    w = model.weights
    layers = 0
    for layer in w.layers:
        for t in (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm, layer.gate_up, layer.gate,
                  layer.up, layer.down):
            if t is not None:
                layers += int(np.prod(t.shape)) * 4
    return {"layers": layers, "lm_head": int(np.prod(w.lm_head.shape)) * 4, "norm": int(np.prod(w.norm.shape)) * 4}


def time_steps(decoder: Any, cache: SlotKVCache, b: int, length: int, reps: int, warm: int = 2) -> list[float]:
    toks = (np.arange(b, dtype=np.int64) * 7919 + 100) % decoder.cfg.vocab_size
    pos = np.full(b, length, dtype=np.int64)
    ts = []
    for i in range(reps + warm):
        t = time.perf_counter()
        logits = decoder.decode_step(cache, toks, pos)
        logits.argmax(axis=-1)  # the engine's greedy path ends the same way
        if i >= warm:
            ts.append(time.perf_counter() - t)
    return ts


def engine_iteration(model: LoadedModel, eng: Engine, b: int, steps: int) -> dict[str, Any]:
    """Seconds per Engine iteration at batch b in steady decode, and the share spent outside the model's forward.

    The decoder's step is wrapped with a timer for the window, so model time and iteration time come from the same
    steps.
    """
    inner = eng.decoder.step
    spent = [0.0, 0]

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    handles = []
    for i in range(b):
        n = steps * 3 + 16
        req = GenerationRequest(prompt_ids=prompt_ids(model, i), max_new_tokens=n, min_new_tokens=n)
        handles.append(eng.submit(req, lambda chunks: None))  # delivered on the engine thread, dropped
    assert eng.wait_until(lambda s: s.active == b and s.prefilling == 0 and s.waiting == 0, 120)
    eng.decoder.step = timed  # type: ignore[method-assign]
    try:
        s0 = eng.stats().steps
        t0 = time.perf_counter()
        eng.wait_until(lambda s: s.steps >= s0 + steps, 300)
        t1 = time.perf_counter()
        s1 = eng.stats().steps
    finally:
        eng.decoder.step = inner  # type: ignore[method-assign]
    for h in handles:
        h.cancel()
    eng.wait_until(lambda s: s.active == 0 and s.waiting == 0 and s.prefilling == 0, 60)
    n = s1 - s0
    it = (t1 - t0) / n
    model_s = spent[0] / max(1, spent[1])
    return {"batch": b, "steps": n, "ms_per_iteration": it * 1e3, "tokens_per_s": b / it,
            "decode_step_ms": model_s * 1e3, "outside_model_fraction": max(0.0, 1 - model_s / it)}


def part_steps(model: LoadedModel, eng: Engine, batches: list[int], length: int, reps: int,
               iter_steps: int) -> dict[str, Any]:
    cfg = model.config
    cache = SlotKVCache(cfg.num_layers, max(batches), cfg.num_kv_heads, cfg.head_dim, eng.config.max_context,
                        "float32")
    cache.ensure(length + 1, max(batches))  # every slot allocated
    bw = copy_bandwidth()
    wb = weight_bytes(model)
    kv_per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # K and V, one slot, one position
    rows = []
    times: dict[int, list[float]] = {b: [] for b in batches}
    with paddle.no_grad():
        for b in batches:
            time_steps(eng.decoder, cache, b, length, 0)  # warm each shape
        for _ in range(reps):  # round-robin over batch sizes, so the host's noise spreads evenly
            for b in batches:
                times[b] += time_steps(eng.decoder, cache, b, length, 1, warm=0)
        for b in batches:
            ts = times[b]
            step = float(np.median(ts))
            weights = wb["layers"] + wb["lm_head"] + wb["norm"] + b * cfg.hidden_size * 4  # + embedding rows
            kv_true = b * kv_per_pos * (length + 1)
            kv_cap = b * kv_per_pos * cache.capacity  # the engine attends over the whole bucket
            bound_s = (weights + kv_true) / (bw["bound_GBps"] * 1e9)
            flops = 2 * b * (wb["layers"] + wb["lm_head"]) / 4 + 4 * b * (length + 1) * cfg.num_heads * cfg.head_dim \
                * cfg.num_layers
            rows.append({
                "batch": b, "length": length, "capacity": cache.capacity, "step_ms_p50": step * 1e3,
                "step_ms_all": [t * 1e3 for t in ts], "tokens_per_s": b / step,
                "bytes_weights": weights, "bytes_kv_at_length": kv_true, "bytes_kv_at_capacity": kv_cap,
                "bound_step_ms": bound_s * 1e3, "bound_tokens_per_s": b / bound_s,
                "fraction_of_bound": bound_s / step, "gflop_per_step": flops / 1e9, "gflops": flops / step / 1e9,
            })
    gc.collect()
    iters = [engine_iteration(model, eng, b, steps=iter_steps) for b in (8, 32)]
    return {"bandwidth": bw, "weight_bytes": wb, "kv_bytes_per_position_per_slot": kv_per_pos, "rows": rows,
            "engine_iterations": iters}


# -- profile ---------------------------------------------------------------------------------------


def part_profile(model: LoadedModel, eng: Engine, batches: list[int], length: int, reps: int) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {}
    cache = SlotKVCache(cfg.num_layers, max(batches), cfg.num_kv_heads, cfg.head_dim, eng.config.max_context,
                        "float32")
    cache.ensure(length + 1, max(batches))
    with paddle.no_grad():
        for b in batches:
            time_steps(eng.decoder, cache, b, length, 1)
            prof = cProfile.Profile()
            toks = (np.arange(b, dtype=np.int64) + 100) % cfg.vocab_size
            pos = np.full(b, length, dtype=np.int64)
            prof.enable()
            for _ in range(reps):
                eng.decoder.decode_step(cache, toks, pos).argmax(axis=-1)
            prof.disable()
            st = pstats.Stats(prof)
            total = sum(v[2] for v in st.stats.values())  # type: ignore[attr-defined]
            rows = []
            for (fname, line, func), (_cc, nc, tt, _ct, _) in st.stats.items():  # type: ignore[attr-defined]
                name = func.replace("<built-in method ", "").rstrip(">").split(".")[-1] + " (C op)" \
                    if fname == "~" else f"{Path(fname).name}:{line}({func})"
                rows.append({"func": name, "calls_per_step": nc / reps,
                             "ms_per_step": tt * 1e3 / reps, "share": tt / total if total else 0.0})
            rows.sort(key=lambda r: -r["ms_per_step"])
            out[str(b)] = {"total_ms_per_step": total * 1e3 / reps, "top": rows[:12]}
    # Attribute the step to its parts by timing each kind of matmul alone at the same shapes.
    out["parts"] = {str(b): matmul_parts(model, eng, b, length) for b in batches}
    return out


def matmul_parts(model: LoadedModel, eng: Engine, b: int, length: int, reps: int = 5) -> dict[str, float]:
    cfg = model.config
    w = eng.decoder.w
    x = paddle.randn([b, cfg.hidden_size], dtype="float32")
    cache = SlotKVCache(1, b, cfg.num_kv_heads, cfg.head_dim, eng.config.max_context, "float32")
    cache.ensure(length + 1, b)
    k, v = cache.active(0, b)
    q = paddle.randn([b, cfg.num_kv_heads, cfg.group_size, cfg.head_dim], dtype="float32")

    def t(fn: Any) -> float:
        fn()
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
        return float(np.median(ts)) * 1e3

    n_layers = cfg.num_layers
    lay = w.layers[0]
    # gate and up, whichever way the decoder holds them (it may have split gate_up and dropped it)
    gu_n = lay.gate_up.numpy() if lay.gate_up is not None else np.concatenate([lay.gate.numpy(), lay.up.numpy()], 1)
    xn, lm_n, down_n = x.numpy(), w.lm_head.numpy(), lay.down.numpy()
    gate_up = paddle.to_tensor(gu_n)
    inter = down_n.shape[0]

    def np_mlp() -> Any:
        gu = xn @ gu_n
        g = gu[:, :inter]
        return (g / (1 + np.exp(-g)) * gu[:, inter:]) @ down_n

    def qkv_o() -> Any:
        paddle.matmul(x, lay.qkv).numpy()
        return paddle.matmul(x, lay.o).numpy()  # o is [nh d, H] and nh d == H for these models

    with paddle.no_grad():
        return {
            "numpy_lm_head_ms": t(lambda: xn @ lm_n),  # the same GEMMs through numpy's BLAS, same process
            "numpy_mlp_ms_all_layers": n_layers * t(np_mlp),
            "lm_head_ms": t(lambda: paddle.matmul(x, w.lm_head).numpy()),
            "qkv_o_ms_all_layers": n_layers * t(qkv_o),
            "mlp_ms_all_layers": n_layers * t(lambda: paddle.matmul(
                paddle.nn.functional.swiglu(paddle.matmul(x, gate_up)), lay.down).numpy()),
            "attention_ms_all_layers": n_layers * t(lambda: paddle.matmul(
                paddle.nn.functional.softmax(paddle.matmul(q, k, transpose_y=True), axis=-1), v).numpy()),
        }


# -- GIL -------------------------------------------------------------------------------------------


async def probe_window(eng: Engine | None, model: LoadedModel, b: int, seconds: float,
                       period: float = 0.001) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    tokens = [0]
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            target = loop.time() + period
            await asyncio.sleep(period)
            lateness.append(loop.time() - target)

    async def stream(i: int) -> None:
        n = eng.config.max_context - 64
        req = GenerationRequest(prompt_ids=prompt_ids(model, i), max_new_tokens=n, min_new_tokens=n)
        gen = eng.generate(req)
        try:
            async for chunk in gen:
                tokens[0] += len(chunk.tokens)
                if stop.is_set():
                    break
        finally:
            gen.cancel()

    streams = [asyncio.create_task(stream(i)) for i in range(b)] if eng is not None else []
    if eng is not None:
        await asyncio.to_thread(eng.wait_until, lambda s: s.active == b and s.waiting == 0, 120)
    t0 = time.perf_counter()
    tok0 = tokens[0]
    p = asyncio.create_task(probe())
    await asyncio.sleep(seconds)
    stop.set()
    await p
    dt = time.perf_counter() - t0
    tok = tokens[0] - tok0
    await asyncio.gather(*streams)
    if eng is not None:
        await asyncio.to_thread(eng.wait_until, lambda s: s.active == 0 and s.waiting == 0, 60)
    ms = [x * 1e3 for x in lateness]
    return {"probe_lateness_ms": summary(ms), "probes": len(ms), "expected_probes": int(seconds / period),
            "decode_tokens_per_s": tok / dt, "over_5ms": sum(1 for x in ms if x > 5.0) / max(1, len(ms))}


def part_gil(model: LoadedModel, eng: Engine, b: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"batch": b, "seconds": seconds}
    default = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.001)
        out["idle_engine_1ms"] = asyncio.run(probe_window(None, model, b, min(2.0, seconds)))
        for label, interval in (("switch_5ms", 0.005), ("switch_1ms", 0.001), ("switch_5ms_again", 0.005),
                                ("switch_1ms_again", 0.001)):
            sys.setswitchinterval(interval)
            out[label] = asyncio.run(probe_window(eng, model, b, seconds))
    finally:
        sys.setswitchinterval(default)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.inproc")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="sweep,steps,profile,gil")
    p.add_argument("--target", default="")
    p.add_argument("--server-pid", type=int, nargs="*", default=[], help="counted as ours by the CPU meter")
    p.add_argument("--max-slots", type=int, default=32)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="sweep rounds per side at each batch size")
    p.add_argument("--ratio-rounds", type=int, default=3, help="sweep rounds per side at batch 1 and 8")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 16, 32])
    p.add_argument("--length", type=int, default=128, help="cache length for decode-step timing")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--gil-seconds", type=float, default=3.0)
    p.add_argument("--iter-steps", type=int, default=8, help="engine iterations timed at batch 8 and 32")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    paddle.set_device("cpu")
    model = load_model(Path(args.model_dir))
    eng = make_engine(model, args.max_slots, args.max_context)
    result: dict[str, Any] = {"model_dir": args.model_dir}
    try:
        for part in parts:
            t = time.perf_counter()
            if part == "sweep":
                result["sweep"] = part_sweep(model, eng, args.target, args.batches, args.new_tokens, args.rounds,
                                             args.ratio_rounds, args.server_pid)
            elif part == "steps":
                result["steps"] = part_steps(model, eng, args.batches, args.length, args.reps, args.iter_steps)
            elif part == "profile":
                result["profile"] = part_profile(model, eng, [8, 32], args.length, args.reps)
            elif part == "gil":
                result["gil"] = part_gil(model, eng, 8, args.gil_seconds)
            else:
                raise SystemExit(f"unknown part {part}")
            result.setdefault("part_seconds", {})[part] = time.perf_counter() - t
            write_json(args.out, result)  # partial results survive a later failure
    finally:
        eng.stop()
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
