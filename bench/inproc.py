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
import dataclasses
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

from bench.measure import (  # noqa: E402
    engine_iteration,
    kv_bytes_per_position,
    make_cache,
    median_ms,
    memory_bandwidth,
    step_bytes,
    step_flops,
    step_inputs,
    timings,
    weight_bytes,
)
from bench.revisions import unsplit  # noqa: E402
from service.config import load_config  # noqa: E402
from service.engine.checkpoints.loader import LoadedModel, load_model  # noqa: E402
from service.engine.kv_cache import SlotKVCache  # noqa: E402
from service.engine.scheduler import Engine  # noqa: E402
from service.engine.types import GenerationRequest  # noqa: E402
from tests.support.load import StreamTimer  # noqa: E402


def make_engine(model: LoadedModel, max_slots: int, max_context: int) -> Engine:
    # The server's engine settings, TOKENSTREAM_* variables included (e.g. TOKENSTREAM_DECODE_THREADS=1), so the
    # in-process figures and the served ones compare the same engine.
    settings = dataclasses.replace(load_config([]).engine, max_slots=max_slots, max_context=max_context)
    eng = Engine(model, settings)
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


def time_steps(decoder: Any, cache: SlotKVCache, b: int, length: int, reps: int, warm: int = 2) -> list[float]:
    toks, pos = step_inputs(decoder.cfg, b, length)
    ts = []
    for i in range(reps + warm):
        t = time.perf_counter()
        logits = decoder.decode_step(cache, toks, pos)
        logits.argmax(axis=-1)  # the engine's greedy path ends the same way
        if i >= warm:
            ts.append(time.perf_counter() - t)
    return ts


def part_steps(model: LoadedModel, eng: Engine, batches: list[int], length: int, reps: int,
               iter_steps: int) -> dict[str, Any]:
    cfg = model.config
    cache = make_cache(cfg, max(batches), length, eng.config.max_context)
    bw = memory_bandwidth()
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
            nbytes = step_bytes(model, b, length)
            bound_s = (nbytes["weights"] + nbytes["kv"]) / (bw["bound_GBps"] * 1e9)
            flops = step_flops(model, b, length)
            rows.append({
                "batch": b, "length": length, "capacity": cache.capacity, "step_ms_p50": step * 1e3,
                "step_ms_all": [t * 1e3 for t in ts], "tokens_per_s": b / step,
                "bytes_weights": nbytes["weights"], "bytes_kv_at_length": nbytes["kv"],
                # the engine attends over the whole bucket unless rows differ in length (true lengths)
                "bytes_kv_at_capacity": b * kv_bytes_per_position(cfg) * cache.capacity,
                "bound_step_ms": bound_s * 1e3, "bound_tokens_per_s": b / bound_s,
                "fraction_of_bound": bound_s / step, "gflop_per_step": flops / 1e9, "gflops": flops / step / 1e9,
            })
    gc.collect()
    iters = [engine_iteration(eng, b, steps=iter_steps) for b in wide(batches)]
    return {"bandwidth": bw, "weight_bytes": weight_bytes(model.weights),
            "kv_bytes_per_position_per_slot": kv_bytes_per_position(cfg), "rows": rows, "engine_iterations": iters}


# -- profile ---------------------------------------------------------------------------------------


def part_profile(model: LoadedModel, eng: Engine, batches: list[int], length: int, reps: int) -> dict[str, Any]:
    cfg = model.config
    out: dict[str, Any] = {}
    cache = make_cache(cfg, max(batches), length, eng.config.max_context)
    with paddle.no_grad():
        for b in batches:
            time_steps(eng.decoder, cache, b, length, 1)
            prof = cProfile.Profile()
            toks, pos = step_inputs(cfg, b, length)
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
        return median_ms(timings(fn, reps))

    n_layers = cfg.num_layers
    lay = w.layers[0]
    # gate and up, whichever way the decoder holds them (it may have split gate_up and dropped it)
    gu_n = unsplit(w).layers[0].gate_up.numpy()  # type: ignore[union-attr]  # unsplit: never None
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
    """Probe lateness over `seconds`, with `b` streams decoding on this loop (none: eng is None)."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    tokens = [0]
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            target = loop.time() + period
            await asyncio.sleep(period)
            lateness.append(loop.time() - target)

    async def stream(i: int, eng: Engine) -> None:
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

    streams = [asyncio.create_task(stream(i, eng)) for i in range(b)] if eng is not None else []
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


def wide(batches: list[int]) -> list[int]:
    """The batch sizes the iteration, profile and GIL parts take: 8 and 32, or the largest swept if smaller."""
    return [b for b in (8, 32) if b <= max(batches)] or [max(batches)]


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
                result["profile"] = part_profile(model, eng, wide(args.batches), args.length, args.reps)
            elif part == "gil":
                result["gil"] = part_gil(model, eng, wide(args.batches)[0], args.gil_seconds)
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
