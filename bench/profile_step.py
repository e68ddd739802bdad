"""Where a decode step's time goes, on SmolLM2-135M's shape (issue #13; results in bench/PROFILE.md).

    python -m bench.profile_step                      # check, bandwidth, steps, breakdown, prefill, resize, engine
    python -m bench.profile_step --parts steps --paths orig,fast,t2 --reps 30
    python -m bench.profile_step --parts breakdown --breakdown-paths orig,fast --batches 1,32
    python -m bench.profile_step --parts arrivals --reps 30

Paths (--paths, --breakdown-paths): 'fast' the engine's decode_step; 'orig' the decoder and cache before issue
#13's levers, loaded from git (bench/revisions.py, REVISIONS["orig"]) into this process; 'plain'
decode_step_plain (that forward op by op, with today's lm_head and cache); 'broadcast_mask'; a VARIANTS key
(DecoderOptions: threads, lm_head, gate/up); a STATIC_VARIANTS key (the Paddle Inference step in
bench/levers/static_step.py).

Parts:
  check      exactness of the engine's paths (prefill, batched and chunked prefill, decode, decode with a prompt
             chunk in the same step) against the plain forward: max |logit difference|, greedy agreement.
  steps      decode_step alone per path and batch, interleaved round by round (A/B on the same noise): median
             ms per step, tokens/s, GB/s of weights + KV read, share of the memory bound, GFLOP/s, and the
             median per-round speed-up against the first path.
  breakdown  the step cut into sections by the decoder's trace hook (inputs, norms, each projection, rotary,
             cache write, attention, lm_head), plus greedy sampling, per path and batch, traced round by round;
             and the same path on a same-depth skeleton model (hidden 72, vocab 256): the per-op floor.
  engine     the Engine's iteration in steady decode at each batch above 1, against the decoder's step timed inside
             it (bench.measure.engine_iteration): what the scheduler, sampling, detokenizing and delivery add.
  prefill    prompts of 20 and 256 tokens, 8 x 20 one call each and in one step, and a decode step of 8 rows
             with a prompt chunk of 16-256 tokens inside it against the two apart.
  resize     growing the cache's capacity with 1, 8 and 32 streams in it (a stall for every stream).
  arrivals   the engine's prompt budget at prefill_stall_steps 1, 1.5 (the default) and 3: 8 streams decode while
             8 prompts of 20 tokens, or one of 256, arrive at once; the streams' longest gap, the newcomers' first
             token. Not in the default parts.
  bandwidth  the practical memory bound (bench.measure.memory_bandwidth): a STREAM copy, a sum and a GEMV over
             --bandwidth-mb MB (issue #13 measured a 2-thread matvec over 1 GiB: --bandwidth-mb 1024).

Every figure is a median over --reps rounds; the machine is shared, so the load average is printed with them.
The model is SmolLM2-135M-Instruct from its GGUF (the registry's default model, fetched on first use); --model-dir
takes any other checkpoint.
"""

from __future__ import annotations

from bench.host import loadavg, mkl_for_amd

mkl_for_amd()  # MKL's AVX2 kernels on AMD, as the server sets them; before the first Paddle import

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import quiet  # noqa: E402

quiet()

import numpy as np  # noqa: E402
import paddle  # noqa: E402

from bench import measure  # noqa: E402
from bench.common import engine_model_path  # noqa: E402
from bench.revisions import DecodeStep, old_decode_step, old_decoder, unsplit  # noqa: E402
from service.engine.api import KERNEL_MODES, EngineConfig  # noqa: E402
from service.engine.attention import Attention  # noqa: E402
from service.engine.checkpoints.loader import LoadedModel, build_weights, load_model  # noqa: E402
from service.engine.checkpoints.model_config import ModelConfig  # noqa: E402
from service.engine.decoder import DecoderOptions, LlamaDecoder  # noqa: E402
from service.engine.kernels import select as select_kernels  # noqa: E402
from service.engine.kv_cache import SlotKVCache  # noqa: E402
from service.engine.scheduler import Engine  # noqa: E402

REFERENCE_BOUND_GBPS = 68.5  # issue #13: numpy 2-thread matvec over 1 GiB on this host, unloaded
ORIG = "orig"  # the 'orig' path: bench/revisions.py's REVISIONS["orig"]


# -- paths ---------------------------------------------------------------------------------------


VARIANTS: dict[str, DecoderOptions] = {
    # name: decoder options of its own, for decode paths measured side by side in one process
    "fused_gate_up": DecoderOptions(split_gate_up=False),
    "lm_numpy": DecoderOptions(lm_head="numpy"),
    "t1": DecoderOptions(threads=1),
    "t2": DecoderOptions(threads=2),
    "t1pl": DecoderOptions(threads=1, lm_head="paddle"),
    "t2pl": DecoderOptions(threads=2, lm_head="paddle"),
    "t1nt": DecoderOptions(threads=1, lm_head="paddle_nt"),
    "t2nt": DecoderOptions(threads=2, lm_head="paddle_nt"),
}
# Paddle Inference on the exported step (bench/levers/static_step.py, dropped): name -> StaticDecodeStep options
STATIC_VARIANTS: dict[str, dict[str, Any]] = {
    "static1": {"threads": 1},
    "static2": {"threads": 2},
    "static2lm": {"threads": 2, "with_lm_head": True},
}


class BroadcastMaskAttention(Attention):
    """The masks as first written: left at [B, 1, 1, cap] for Paddle's add to broadcast in every layer."""

    @staticmethod
    def mask(allowed: np.ndarray, shape: tuple[int, ...]) -> paddle.Tensor:
        return paddle.to_tensor(np.where(allowed, np.float32(0.0), np.float32(-1e30)))


def paths(model: LoadedModel, dec: LlamaDecoder, which: list[str]) -> dict[str, DecodeStep]:
    """The decode paths to time: 'orig' (the decoder as of REVISIONS["orig"], from git), 'plain'
    (decode_step_plain: that forward op by op, with today's lm_head), 'fast' (what the engine uses),
    'broadcast_mask', a VARIANTS key (a decoder of its own on the same weights) or a STATIC_VARIANTS key."""
    out: dict[str, DecodeStep] = {}
    cfg = model.config
    for name in which:
        if name == "fast":
            out[name] = dec.decode_step
        elif name == "plain":
            out[name] = getattr(dec, "decode_step_plain", dec.decode_step)
        elif name == "orig":
            out[name] = old_decode_step(ORIG, cfg, old_decoder(ORIG, cfg, model.weights))
        elif name == "broadcast_mask":  # the masks as first written: broadcast by Paddle's add in every layer
            other = LlamaDecoder(cfg, model.weights, 2048, "float32")
            other.attention = BroadcastMaskAttention(cfg)
            out[name] = other.decode_step
        elif name in STATIC_VARIANTS:
            from bench.levers.static_step import static_decode_path

            out[name] = static_decode_path(model, dec, **STATIC_VARIANTS[name])
        else:
            weights = unsplit(model.weights) if not VARIANTS[name].split_gate_up else model.weights
            out[name] = LlamaDecoder(cfg, weights, 2048, "float32", options=VARIANTS[name]).decode_step
    return out


def skeleton(cfg: ModelConfig) -> tuple[ModelConfig, LlamaDecoder]:
    """The same depth and op graph with tiny dimensions: its step time is the per-op floor."""
    raw = {"architectures": ["LlamaForCausalLM"], "hidden_size": 72, "intermediate_size": 16, "vocab_size": 256,
           "head_dim": 8, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
           "tie_word_embeddings": True, "max_position_embeddings": 2048}
    small = ModelConfig.from_dict(raw)
    rng = np.random.default_rng(0)
    h, i, q, kv = 72, 16, cfg.num_heads * 8, cfg.num_kv_heads * 8  # head_dim 8

    def lin(o: int, n: int) -> paddle.Tensor:
        return paddle.to_tensor((rng.standard_normal((o, n)) / np.sqrt(n)).astype(np.float32))

    state = {"model.embed_tokens.weight": lin(256, h), "model.norm.weight": paddle.ones([h])}
    for n in range(small.num_layers):
        p = f"model.layers.{n}."
        state |= {
            p + "input_layernorm.weight": paddle.ones([h]), p + "post_attention_layernorm.weight": paddle.ones([h]),
            p + "self_attn.q_proj.weight": lin(q, h), p + "self_attn.k_proj.weight": lin(kv, h),
            p + "self_attn.v_proj.weight": lin(kv, h), p + "self_attn.o_proj.weight": lin(h, q),
            p + "mlp.gate_proj.weight": lin(i, h), p + "mlp.up_proj.weight": lin(i, h),
            p + "mlp.down_proj.weight": lin(h, i),
        }
    return small, LlamaDecoder(small, build_weights(small, state, "float32"), 2048, "float32")


# -- parts -----------------------------------------------------------------------------------------


def part_steps(model: LoadedModel, dec: LlamaDecoder, batches: list[int], length: int, reps: int,
               which: list[str], bound_gbps: float) -> dict[str, Any]:
    cfg = model.config
    steps = paths(model, dec, which)
    cache = measure.make_cache(cfg, max(batches), length)
    times: dict[tuple[str, int], list[float]] = {(p, b): [] for p in steps for b in batches}
    cpu: dict[tuple[str, int], list[float]] = {(p, b): [] for p in steps for b in batches}
    ref = next(iter(steps))
    for b in batches:  # warm every shape and path once
        for fn in steps.values():
            fn(cache, *measure.step_inputs(cfg, b, length)).argmax(-1)
    for _ in range(reps):  # round-robin: each path and batch sees the same stretch of host noise
        for b in batches:
            for name, fn in steps.items():
                tok, pos = measure.step_inputs(cfg, b, length)
                c = time.thread_time()
                t = time.perf_counter()
                fn(cache, tok, pos).argmax(-1)
                times[(name, b)].append(time.perf_counter() - t)
                cpu[(name, b)].append(time.thread_time() - c)
    rows = []
    for (name, b), ts in times.items():
        s = float(np.median(ts))
        nbytes = sum(measure.step_bytes(model, b, length).values())
        rows.append({
            "path": name, "batch": b, "length": length, "capacity": cache.capacity, "ms_p50": s * 1e3,
            "ms_p10": float(np.percentile(ts, 10)) * 1e3, "ms_p90": float(np.percentile(ts, 90)) * 1e3,
            "tok_s": b / s, "GBps": nbytes / s / 1e9, "bound_ms": nbytes / bound_gbps / 1e6,
            "of_bound": nbytes / bound_gbps / 1e9 / s, "GFLOPs": measure.step_flops(model, b, length) / s / 1e9,
            "ms_min": min(ts) * 1e3, "ms_all": [t * 1e3 for t in ts],
            # CPU time of the calling thread: less sensitive to the host's load, blind to other threads' work
            "thread_cpu_ms_p50": measure.median_ms(cpu[(name, b)]),
            # paired with the first path's time in the same round: robust to the host's load drifting
            "vs_first": float(np.median(np.array(times[(ref, b)]) / np.array(ts))),
        })
    return {"rows": rows}


class Marks:
    """The decoder's trace hook: adds the time since the previous mark to the section just ended."""

    def __init__(self) -> None:
        self.acc: dict[str, float] = {}
        self.last = 0.0

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.acc[name] = self.acc.get(name, 0.0) + now - self.last
        self.last = now


def traced_once(dec: Any, fn: Callable[[], Any], per: dict[str, list[float]]) -> None:
    """One step of `fn` with `dec`'s trace hook on: each section's time (summed over layers) appended to `per`,
    with 'untraced' (after the last section), 'sampling' (greedy argmax) and 'total'."""
    mark = Marks()
    dec.trace = mark
    try:
        t0 = mark.last = time.perf_counter()
        logits = fn()
        mark("untraced")
        logits.argmax(-1)
        mark("sampling")
        total = time.perf_counter() - t0
    finally:
        dec.trace = None
    for k, v in mark.acc.items():
        per.setdefault(k, []).append(v)
    per.setdefault("total", []).append(total)


def part_breakdown(model: LoadedModel, dec: LlamaDecoder, batches: list[int], length: int, reps: int,
                   paths: list[str]) -> dict[str, Any]:
    """Sections of each path ('fast': the engine's decode_step, 'plain': decode_step_plain, 'orig': the decoder
    as of REVISIONS["orig"]), and of the same path on the skeleton model (the floor), traced round by round."""
    cfg = model.config
    cache = measure.make_cache(cfg, max(batches), length)
    small_cfg, small = skeleton(cfg)
    small_cache = measure.make_cache(small_cfg, max(batches), length)
    runs: dict[str, tuple[Any, DecodeStep, Any, DecodeStep]] = {}  # path -> (decoder, step, skeleton decoder, its step)
    for path in paths:
        if path == "orig":
            d, sd = old_decoder(ORIG, cfg, model.weights), old_decoder(ORIG, small_cfg, small.w)
            runs[path] = (d, old_decode_step(ORIG, cfg, d), sd, old_decode_step(ORIG, small_cfg, sd))
        elif path == "plain":
            runs[path] = (dec, dec.decode_step_plain, small, small.decode_step_plain)
        else:
            runs[path] = (dec, dec.decode_step, small, small.decode_step)
    out: dict[str, Any] = {p: {} for p in paths}
    for b in batches:
        tok, pos = measure.step_inputs(cfg, b, length)
        stok, spos = measure.step_inputs(small_cfg, b, length)
        per: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]] = {p: ({}, {}) for p in paths}
        for _, step, _, small_step in runs.values():
            for _ in range(2):
                step(cache, tok, pos)
                small_step(small_cache, stok, spos)
        for _ in range(reps):
            for p, (d, step, sd, small_step) in runs.items():
                traced_once(d, functools.partial(step, cache, tok, pos), per[p][0])
                traced_once(sd, functools.partial(small_step, small_cache, stok, spos), per[p][1])
        for p in paths:
            out[p][str(b)] = {"sections": {k: measure.median_ms(v) for k, v in per[p][0].items()},
                              "floor": {k: measure.median_ms(v) for k, v in per[p][1].items()}}
    return out


def part_engine(model: LoadedModel, batches: list[int], steps: int) -> dict[str, Any]:
    """The Engine's iteration in steady decode at each batch, with the decoder's step timed inside the same
    iterations: the rest is the scheduler, sampling, detokenizing and delivery."""
    eng = Engine(model, EngineConfig(max_slots=max(batches), max_context=2048))
    eng.start(warmup=True)
    try:
        return {str(b): measure.engine_iteration(eng, b, steps) for b in batches}
    finally:
        eng.stop()


def part_prefill(model: LoadedModel, dec: LlamaDecoder, reps: int, decode_batch: int = 8,
                 length: int = 84) -> dict[str, Any]:
    """Prompt processing, each case from empty slots, interleaved round by round:
    - one prompt of 20 and of 256 tokens; 8 prompts of 20 one call each (the scheduler today) and in one step;
    - a decode step of `decode_batch` rows alone, and with a prompt chunk of C tokens in the same step (what a
      scheduler mixing prefill into decode would run): the extra time is how long that chunk stalls the streams.
    """
    from service.engine.decoder import PrefillChunk

    cfg = model.config
    b = decode_batch
    cache = measure.make_cache(cfg, b + 8, 300)
    rng = np.random.default_rng(1)
    p20 = [rng.integers(0, cfg.vocab_size, 20).astype(np.int64) for _ in range(8)]
    p256 = rng.integers(0, cfg.vocab_size, 256).astype(np.int64)
    tok, pos = measure.step_inputs(cfg, b, length)
    none = np.zeros(0, dtype=np.int64)
    def decode_with_chunk(c: int) -> Any:
        return dec.step(cache, tok, pos, [PrefillChunk(b, p256[:c], 0, True)])

    def chunk_alone(c: int) -> Any:
        return dec.prefill(cache, b, p256[:c], 0, True)

    cases: dict[str, Callable[[], Any]] = {
        "1x20": lambda: dec.prefill(cache, b, p20[0], 0, True),
        "1x256": lambda: dec.prefill(cache, b, p256, 0, True),
        "8x20 one call each": lambda: [dec.prefill(cache, b + s, p20[s], 0, True) for s in range(8)],
        "8x20 in one step": lambda: dec.step(cache, none, none, [PrefillChunk(b + s, p20[s], 0, True)
                                                                 for s in range(8)]),
        f"decode B={b}": lambda: dec.decode_step(cache, tok, pos),
    }
    for c in (16, 32, 64, 128, 256):
        cases[f"chunk {c} alone"] = functools.partial(chunk_alone, c)
        cases[f"decode B={b} + chunk {c}"] = functools.partial(decode_with_chunk, c)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():
        fn()
    for _ in range(reps):
        for k, fn in cases.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: {"ms_p50": measure.median_ms(v), "ms_min": min(v) * 1e3} for k, v in times.items()}


def arrivals_once(eng: Engine, cfg: ModelConfig, runners: int, newcomers: int, prompt_len: int) -> dict[str, float]:
    """`runners` streams decode; then `newcomers` prompts of `prompt_len` tokens arrive at once. Returns the
    runners' longest gap between tokens while the newcomers were being let in, their usual gap, and the
    newcomers' time to first token."""
    from service.engine.types import GenerationRequest

    times: dict[int, list[float]] = {}

    def sink(i: int) -> Callable[[list[Any]], None]:
        times[i] = []
        return lambda chunks: times[i].extend([time.perf_counter()] * sum(len(c.tokens) > 0 for c in chunks))

    def prompt(i: int, n: int) -> list[int]:
        return [(i * 131 + j * 7 + 3) % cfg.vocab_size for j in range(n)]

    handles = [eng.submit(GenerationRequest(prompt_ids=prompt(i, 20), max_new_tokens=100_000), sink(i))
               for i in range(runners)]
    assert eng.wait_until(lambda st: st.active == runners and st.waiting == 0 and st.prefilling == 0, 300)
    s0 = eng.stats().steps
    eng.wait_until(lambda st: st.steps >= s0 + 6, 300)  # steady decode, the moving averages settled
    t0 = time.perf_counter()
    new = [eng.submit(GenerationRequest(prompt_ids=prompt(100 + i, prompt_len), max_new_tokens=4),
                      sink(100 + i)) for i in range(newcomers)]
    assert eng.wait_until(lambda st: all(times[100 + i] for i in range(newcomers)), 600)
    t1 = max(times[100 + i][0] for i in range(newcomers))
    s1 = eng.stats().steps
    eng.wait_until(lambda st: st.steps >= s1 + 4, 300)
    for h in handles + new:
        h.cancel()
    eng.wait_until(lambda st: st.active == 0 and st.waiting == 0 and st.prefilling == 0, 120)
    gaps_in, gaps_before = [], []
    for i in range(runners):
        ts = np.array(times[i])
        d = np.diff(ts)
        gaps_before += list(d[ts[1:] < t0])
        gaps_in += list(d[(ts[1:] > t0) & (ts[:-1] < t1)])
    ttft = [times[100 + i][0] - t0 for i in range(newcomers)]
    return {"runner_gap_before_ms_p50": float(np.median(gaps_before)) * 1e3,
            "runner_gap_max_ms": float(max(gaps_in)) * 1e3 if gaps_in else 0.0,
            "newcomer_ttft_ms_p50": float(np.median(ttft)) * 1e3, "newcomer_ttft_ms_max": float(max(ttft)) * 1e3,
            "admission_s": t1 - t0}


STALLS = (1.0, EngineConfig.prefill_stall_steps, 3.0)  # prefill_stall_steps compared by 'arrivals'


def part_arrivals(model: LoadedModel, reps: int, runners: int = 8) -> dict[str, Any]:
    """The engine's prompt budget (prompt chunks inside the decode step, a step allowed prefill_stall_steps decode
    steps of extra time) at STALLS: `runners` streams decode while 8 prompts of 20 tokens, or one of 256, arrive
    at once."""
    cfg = model.config
    engines = {f"stall <= {stall:g} steps": Engine(model, EngineConfig(max_slots=32, max_context=2048,
                                                                        prefill_stall_steps=stall))
               for stall in STALLS}
    out: dict[str, Any] = {}
    try:
        for eng in engines.values():
            eng.start(warmup=True)
            arrivals_once(eng, cfg, runners, 8, 20)  # learns the step and prefill speeds; not recorded
        for scenario, (n, length) in {"8 x 20 tokens": (8, 20), "1 x 256 tokens": (1, 256)}.items():
            for _ in range(reps):
                for name, eng in engines.items():
                    out.setdefault(f"{scenario}: {name}", []).append(arrivals_once(eng, cfg, runners, n, length))
    finally:
        for eng in engines.values():
            eng.stop()
    return {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in out.items()}


def part_resize(cfg: ModelConfig, reps: int, max_slots: int = 32) -> dict[str, Any]:
    """Growing the cache's capacity (64 -> 128 and 128 -> 256) with 1, 8 and 32 streams in it: the cache today
    (SlotKVCache.ensure) against the first one (every one of max_slots slots, zeros + a strided copy)."""

    def first(used: int, a: int, b: int) -> float:
        shape = [cfg.num_layers, max_slots, cfg.num_kv_heads, a, cfg.head_dim]
        old_k, old_v = paddle.zeros(shape), paddle.zeros(shape)
        t = time.perf_counter()
        shape[3] = b
        k, v = paddle.zeros(shape), paddle.zeros(shape)
        k[:, :used, :, :a] = old_k[:, :used]
        v[:, :used, :, :a] = old_v[:, :used]
        return time.perf_counter() - t

    def now(used: int, a: int, b: int) -> float:
        c = SlotKVCache(cfg.num_layers, max_slots, cfg.num_kv_heads, cfg.head_dim, 2048, "float32")
        c.ensure(a, used)
        t = time.perf_counter()
        c.ensure(b, used)
        return time.perf_counter() - t

    out = {}
    for used in (1, 8, 32):
        for a, b in ((64, 128), (128, 256)):
            ts: dict[str, list[float]] = {"first": [], "now": []}
            for _ in range(reps):
                ts["first"].append(first(used, a, b))
                ts["now"].append(now(used, a, b))
            out[f"{used} streams, {a}->{b}"] = {k: measure.median_ms(v) for k, v in ts.items()}
    return out


def part_check(model: LoadedModel, dec: LlamaDecoder, decode_steps: int = 12) -> dict[str, Any]:
    """Exactness of the engine's paths against the plain forward (prefill_plain, decode_step_plain): the largest
    |logit difference| and whether greedy tokens agree, for prefill (one-shot, chunked, several prompts in one
    step), decode, and decode rows with a prompt chunk in the same step."""
    from service.engine.decoder import PrefillChunk

    cfg = model.config
    rng = np.random.default_rng(0)
    none = np.zeros(0, dtype=np.int64)
    lens = [3, 17, 60, 64, 9]
    prompts = [rng.integers(0, cfg.vocab_size, n).astype(np.int64) for n in lens]
    ref, new = measure.make_cache(cfg, 8, 200), measure.make_cache(cfg, 8, 200)
    worst: dict[str, float] = {}
    agree = True

    def diff(key: str, a: np.ndarray | None, b: np.ndarray | None) -> None:
        nonlocal agree
        assert a is not None
        assert b is not None
        worst[key] = max(worst.get(key, 0.0), float(np.abs(a - b).max()))
        agree &= bool((a.argmax(-1) == b.argmax(-1)).all())

    want = []  # reference: one prompt at a time, slot 1 in two chunks
    for s, p in enumerate(prompts):
        if s == 1:
            dec.prefill_plain(ref, s, p[:7], 0, False)
        want.append(dec.prefill_plain(ref, s, p[7:] if s == 1 else p, 7 if s == 1 else 0, True))
    got = {0: dec.prefill(new, 0, prompts[0], 0, True)}
    _, outs = dec.step(new, none, none, [PrefillChunk(1, prompts[1][:7], 0, False),
                                         PrefillChunk(2, prompts[2], 0, True), PrefillChunk(3, prompts[3], 0, True)])
    got[2], got[3] = outs[1], outs[2]
    _, outs = dec.step(new, none, none,
                       [PrefillChunk(1, prompts[1][7:], 7, True), PrefillChunk(4, prompts[4], 0, True)])
    got[1], got[4] = outs
    for s in range(len(prompts)):
        diff("prefill", want[s], got[s])
    pos = np.array(lens, dtype=np.int64)
    tok = np.array([int(w.argmax()) for w in want], dtype=np.int64)  # type: ignore[union-attr]
    for _ in range(decode_steps):
        a = dec.decode_step_plain(ref, tok, pos)
        diff("decode", a, dec.decode_step(new, tok, pos))
        tok, pos = a.argmax(-1).astype(np.int64), pos + 1
    extra = rng.integers(0, cfg.vocab_size, 11).astype(np.int64)
    a, b = dec.decode_step_plain(ref, tok, pos), dec.prefill_plain(ref, 5, extra, 0, True)
    c, outs = dec.step(new, tok, pos, [PrefillChunk(5, extra, 0, True)])
    diff("mixed: decode rows", a, c)
    diff("mixed: prompt chunk", b, outs[0])
    worst["cache"] = max(float((ref._k_all - new._k_all).abs().max()), float((ref._v_all - new._v_all).abs().max()))
    return {"max_abs_diff": worst, "greedy_agree": agree}


# -- report ----------------------------------------------------------------------------------------


def print_steps(res: dict[str, Any]) -> None:
    print("path     batch   ms p50 (p10-p90)      min  thread-cpu   tok/s   GB/s  of bound  GFLOP/s  vs first")
    for r in sorted(res["rows"], key=lambda r: r["batch"]):
        print(f"{r['path']:8} {r['batch']:5} {r['ms_p50']:8.2f} ({r['ms_p10']:.1f}-{r['ms_p90']:.1f}) "
              f"{r['ms_min']:7.2f} {r['thread_cpu_ms_p50']:8.2f} {r['tok_s']:8.1f} {r['GBps']:6.1f} "
              f"{r['of_bound']:8.0%} {r['GFLOPs']:8.1f} {r['vs_first']:8.2f}x")


ORDER = ["inputs", "norm", "qkv", "rotary", "cache_write", "attention", "o_proj", "gate_up", "down", "lm_head",
         "untraced", "sampling", "total"]


def print_breakdown(res: dict[str, Any]) -> None:
    batches = list(res)
    print("section        " + "".join(f"   B={b:<4} floor" for b in batches))
    for k in ORDER:
        cells = ""
        for b in batches:
            s, f = res[b]["sections"].get(k, 0.0), res[b]["floor"].get(k, 0.0)
            cells += f" {s:8.2f} {f:5.2f}"
        print(f"{k:14}{cells}")


def print_prefill(res: dict[str, Any]) -> None:
    for k, v in res.items():
        print(f"prefill {k:26} {v['ms_p50']:8.1f} ms p50 {v['ms_min']:8.1f} min")
    dec = next((v["ms_p50"] for k, v in res.items() if k.startswith("decode") and "+" not in k), None)
    for k, v in res.items():
        if "+ chunk" in k and dec is not None:
            alone = res[f"chunk {k.split()[-1]} alone"]["ms_p50"]
            stall, saved = v["ms_p50"] - dec, dec + alone - v["ms_p50"]
            print(f"  {k}: stalls the decode rows {stall:7.1f} ms; saves {saved:6.1f} ms against a separate prefill")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="checkpoint (default: the SmolLM2-shaped random one)")
    ap.add_argument("--parts", default="check,bandwidth,steps,breakdown,prefill,resize,engine")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--paths", default="plain,fast", help="decode paths to time in 'steps'")
    ap.add_argument("--breakdown-paths", default="fast", help="'fast' and/or 'plain'")
    ap.add_argument("--length", type=int, default=84, help="cached positions per row (20-token prompt + 64)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kernels", default="auto", choices=KERNEL_MODES, help="the fused kernels 'fast' runs with: "
                    "'auto' those this CPU proved, as the engine does (service/engine/kernels.py)")
    ap.add_argument("--bandwidth-mb", type=int, default=256, help="array size of the 'bandwidth' part")
    ap.add_argument("--json", default=None, help="write the results here too")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    paddle.set_device("cpu")
    model = load_model(args.model_dir or engine_model_path("smollm2"))
    dec = LlamaDecoder(model.config, model.weights, 2048, "float32", kernels=select_kernels(args.kernels))
    results: dict[str, Any] = {"load_start": loadavg(), "env": {k: os.environ.get(k) for k in
                                                            ("MKL_DEBUG_CPU_TYPE", "OMP_NUM_THREADS",
                                                             "KMP_BLOCKTIME")}}
    print(f"load average {loadavg()}, {model.config.num_layers} layers, hidden {model.config.hidden_size}, "
          f"length {args.length}")
    bound = REFERENCE_BOUND_GBPS
    with paddle.no_grad():
        if "check" in parts:
            results["check"] = chk = part_check(model, dec)
            print("exactness vs the plain forward: max |logit diff| " +
                  ", ".join(f"{k} {v:.1e}" for k, v in chk["max_abs_diff"].items()) +
                  f"; greedy tokens agree: {chk['greedy_agree']}")
        if "bandwidth" in parts:
            results["bandwidth"] = bw = measure.memory_bandwidth(args.bandwidth_mb)
            print(f"memory bound over {args.bandwidth_mb} MB: {bw['bound_GBps']:.1f} GB/s (GEMV "
                  f"{bw['gemv_read_GBps_best']:.1f}, copy {bw['numpy_copy_GBps_best']:.1f}, sum "
                  f"{bw['numpy_read_GBps_best']:.1f}; issue #13 reference {REFERENCE_BOUND_GBPS}: shares below use it)")
        if "steps" in parts:
            results["steps"] = part_steps(model, dec, batches, args.length, args.reps, args.paths.split(","), bound)
            print_steps(results["steps"])
        if "breakdown" in parts:
            bd = part_breakdown(model, dec, batches, args.length, args.reps, args.breakdown_paths.split(","))
            for path, res in bd.items():
                results[f"breakdown_{path}"] = res
                print(f"breakdown of '{path}', ms per step (median; 'floor': the same ops on the skeleton model)")
                print_breakdown(res)
        if "prefill" in parts:
            results["prefill"] = part_prefill(model, dec, max(3, args.reps // 4))
            print_prefill(results["prefill"])
    if "resize" in parts:
        results["resize"] = part_resize(model.config, max(3, args.reps // 5))
        for k, v in results["resize"].items():
            print(f"cache growth {k:22}: {v['first']:7.1f} ms as first written, {v['now']:7.1f} ms now")
    if "arrivals" in parts:
        results["arrivals"] = part_arrivals(model, max(1, args.reps // 10))
        for k, v in results["arrivals"].items():
            print(f"arrivals {k:40}: runners' gap {v['runner_gap_before_ms_p50']:6.1f} ms before, longest "
                  f"{v['runner_gap_max_ms']:7.1f} ms while admitting; newcomers' first token p50 "
                  f"{v['newcomer_ttft_ms_p50']:7.1f} ms, max {v['newcomer_ttft_ms_max']:7.1f} ms")
    if "engine" in parts:
        del dec
        results["engine"] = part_engine(model, [b for b in batches if b > 1] or batches, steps=args.reps)
        for b, v in results["engine"].items():
            print(f"engine B={b:>3}: iteration {v['ms_per_iteration']:.1f} ms, the decoder's step "
                  f"{v['decode_step_ms']:.1f} ms, outside the model {v['outside_model_ms']:.1f} ms "
                  f"({v['tokens_per_s']:.1f} tok/s)")
    results["load_end"] = loadavg()
    print(f"load average at the end {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
