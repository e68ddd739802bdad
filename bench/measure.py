"""The measurements more than one benchmark takes, each in one place: the memory bandwidth, the bytes and FLOPs of
a decode step, one Engine iteration, and the inputs and cache a timed decode step runs on.

Imports Paddle: for processes that time the engine (bench.inproc, bench.profile_step, the levers), not for the
orchestrator or the load generator (bench.common stays light).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import paddle

from service.engine.checkpoints.loader import LoadedModel
from service.engine.checkpoints.model_config import ModelConfig
from service.engine.decoder import ModelWeights
from service.engine.kv_cache import SlotKVCache
from service.engine.scheduler import Engine
from service.engine.types import GenerationRequest

F32 = 4  # bytes per float32 value


def median_ms(ts: list[float]) -> float:
    """The median of timings in seconds, in milliseconds."""
    return float(np.median(ts)) * 1e3


def timings(fn: Callable[[], object], reps: int) -> list[float]:
    """Seconds of `reps` calls of fn, after one call to warm it."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


# -- what a timed decode step runs on ------------------------------------------------------------


def step_inputs(cfg: ModelConfig, b: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [B] (spread over the vocabulary) and positions [B] (all at `length`) for a decode step."""
    tokens = (np.arange(b, dtype=np.int64) * 7919 + 100) % cfg.vocab_size
    return tokens, np.full(b, length, dtype=np.int64)


def make_cache(cfg: ModelConfig, slots: int, length: int, max_context: int = 2048) -> SlotKVCache:
    """A float32 slot cache with every slot allocated and room for `length` + 1 positions."""
    cache = SlotKVCache(cfg.num_layers, slots, cfg.num_kv_heads, cfg.head_dim, max_context, "float32")
    cache.ensure(length + 1, slots)
    return cache


# -- bytes and FLOPs of a decode step ------------------------------------------------------------


def weight_bytes(weights: ModelWeights) -> dict[str, int]:
    """Bytes of the weights a decode step reads: the layers' (whichever way the decoder holds gate/up), the final
    norm, the [H, V] lm_head."""
    layers = sum(int(np.prod(t.shape)) * F32 for layer in weights.layers for t in
                 (layer.input_norm, layer.qkv, layer.qkv_bias, layer.o, layer.post_norm, layer.gate_up, layer.gate,
                  layer.up, layer.down) if t is not None)
    return {"layers": layers, "lm_head": int(np.prod(weights.lm_head.shape)) * F32,
            "norm": int(np.prod(weights.norm.shape)) * F32}


def kv_bytes_per_position(cfg: ModelConfig) -> int:
    """K and V of one position of one slot, all layers."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * F32


def step_bytes(model: LoadedModel, b: int, length: int) -> dict[str, int]:
    """Bytes a decode step of B rows at cache length `length` must read: the weights, B embedding rows
    ('weights'), and the K/V up to the length ('kv')."""
    wb = weight_bytes(model.weights)
    weights = wb["layers"] + wb["lm_head"] + wb["norm"] + b * model.config.hidden_size * F32
    return {"weights": weights, "kv": b * kv_bytes_per_position(model.config) * (length + 1)}


def step_flops(model: LoadedModel, b: int, length: int) -> float:
    """Multiply-adds x 2 of a decode step: every matrix once per row, and attention over `length` + 1 positions."""
    cfg, wb = model.config, weight_bytes(model.weights)
    params = (wb["layers"] + wb["lm_head"]) / F32
    return 2.0 * b * params + 4.0 * b * (length + 1) * cfg.num_heads * cfg.head_dim * cfg.num_layers


# -- the memory bound ----------------------------------------------------------------------------


def memory_bandwidth(mb: int = 256, reps: int = 5) -> dict[str, Any]:
    """The best of a STREAM copy (2 x bytes / time: a copy reads and writes every byte, numpy and Paddle), a sum,
    and a GEMV reading an `mb` MB matrix on all of BLAS's threads (as a batch-1 decode step reads its weights: the
    practical read bandwidth a decoder can reach); and 1024^3 GEMMs in Paddle and numpy."""

    def best(fn: Callable[[], object]) -> float:
        return min(timings(fn, reps))

    n = mb * (1 << 20) // F32
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    x = paddle.ones([n], dtype="float32")
    y = paddle.assign(x)
    np_copy = 2 * src.nbytes / best(lambda: np.copyto(dst, src))
    pd_copy = 2 * src.nbytes / best(lambda: (paddle.assign(x, output=y), float(y[-1])))
    read = src.nbytes / best(lambda: float(src.sum(dtype=np.float32)))
    w, v = src.reshape(-1, 1024), np.ones(1024, dtype=np.float32)
    gemv = src.nbytes / best(lambda: w @ v)
    a = paddle.randn([1024, 1024], dtype="float32")
    an = a.numpy()
    flop = 2 * 1024**3
    return {"array_mb": mb, "numpy_copy_GBps_best": np_copy / 1e9, "paddle_copy_GBps_best": pd_copy / 1e9,
            "numpy_read_GBps_best": read / 1e9, "gemv_read_GBps_best": gemv / 1e9,
            "bound_GBps": max(np_copy, pd_copy, read, gemv) / 1e9,
            "paddle_gemm1024_GFLOPS": flop / best(lambda: paddle.matmul(a, a).numpy()) / 1e9,
            "numpy_gemm1024_GFLOPS": flop / best(lambda: an @ an) / 1e9}


# -- one Engine iteration ------------------------------------------------------------------------


def engine_iteration(eng: Engine, b: int, steps: int, prompt_len: int = 20) -> dict[str, Any]:
    """An Engine iteration at batch b in steady decode, and the share of it outside the model's forward (the
    scheduler, sampling, detokenizing, delivery: chunks are dropped on the engine thread). The decoder's step is
    wrapped with a timer for the window, so model time and iteration time come from the same steps."""
    vocab = eng.model.config.vocab_size
    inner = eng.decoder.step
    spent = [0.0, 0]

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t
            spent[1] += 1

    n = steps * 3 + 16
    handles = [eng.submit(GenerationRequest(prompt_ids=[(i * 31 + j * 7 + 3) % vocab for j in range(prompt_len)],
                                            max_new_tokens=n, min_new_tokens=n), lambda chunks: None)
               for i in range(b)]
    assert eng.wait_until(lambda s: s.active == b and s.prefilling == 0 and s.waiting == 0, 300)
    eng.decoder.step = timed  # type: ignore[method-assign]
    try:
        s0 = eng.stats().steps
        t0 = time.perf_counter()
        eng.wait_until(lambda s: s.steps >= s0 + steps, 600)
        t1 = time.perf_counter()
        done = eng.stats().steps - s0
    finally:
        eng.decoder.step = inner  # type: ignore[method-assign]
    for h in handles:
        h.cancel()
    eng.wait_until(lambda s: s.active == 0 and s.waiting == 0 and s.prefilling == 0, 120)
    it = (t1 - t0) / max(1, done)
    model_s = spent[0] / max(1, spent[1])
    return {"batch": b, "steps": done, "ms_per_iteration": it * 1e3, "tokens_per_s": b / it,
            "decode_step_ms": model_s * 1e3, "outside_model_ms": max(0.0, it - model_s) * 1e3,
            "outside_model_fraction": max(0.0, 1 - model_s / it)}
