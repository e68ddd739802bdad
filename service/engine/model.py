"""A compact Llama-family decoder in Paddle over a slot KV cache.

Shapes: B active slots, C prompt tokens in a prefill chunk, H hidden, nh query heads, kv key/value heads,
g = nh // kv queries per key/value head, d head_dim, cap the cache's current capacity, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from service.engine.kv_cache import SlotKVCache
from service.engine.model_config import DType, ModelConfig

MASKED = -1e30  # additive mask; -inf can turn a fully masked row into NaN


@dataclass
class LayerWeights:
    input_norm: paddle.Tensor  # [H]
    qkv: paddle.Tensor  # [H, (nh + 2 kv) d], fused and pre-transposed for x @ W
    qkv_bias: paddle.Tensor | None  # [(nh + 2 kv) d]
    o: paddle.Tensor  # [nh d, H]
    post_norm: paddle.Tensor  # [H]
    gate_up: paddle.Tensor  # [H, 2 I], fused for swiglu
    down: paddle.Tensor  # [I, H]


@dataclass
class ModelWeights:
    embed: paddle.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: paddle.Tensor  # [H]
    lm_head: paddle.Tensor  # [H, V], pre-transposed (a copy when embeddings are tied: faster at small B)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse RoPE frequencies [d/2], with Llama 3 and linear scaling as the reference libraries apply them."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling.get("original_max_position_embeddings", 8192))
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv


class LlamaDecoder:
    """Llama, Qwen2, Mistral and ERNIE-4.5 dense share this forward: RMSNorm, RoPE, GQA and SwiGLU."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, max_context: int, dtype: DType) -> None:
        self.cfg = cfg
        self.w = weights
        self.dtype = dtype
        self.max_context = max_context
        freqs = np.outer(np.arange(max_context, dtype=np.float64), rope_inv_freq(cfg))  # [T, d/2]
        emb = np.concatenate([freqs, freqs], axis=-1)  # [T, d]
        self.cos = paddle.to_tensor(np.cos(emb).astype(np.float32)).astype(dtype)  # [T, d]
        self.sin = paddle.to_tensor(np.sin(emb).astype(np.float32)).astype(dtype)  # [T, d]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_width = cfg.num_heads * cfg.head_dim
        self.kv_width = cfg.num_kv_heads * cfg.head_dim
        # On CPU the lm_head runs in numpy's BLAS, on the same memory (a DLPack view, no copy): for this
        # [B, H] x [H, V] shape Paddle's CPU matmul measured 1.7-2.8x slower at B >= 8 and equal at B = 1.
        on_cpu = weights.lm_head.place.is_cpu_place() and weights.lm_head.dtype == paddle.float32
        self._host_lm_head = np.from_dlpack(weights.lm_head) if on_cpu else None  # [H, V]
        # Profiling hook (bench/profile_step.py): called with a section's name when that section ends.
        self.trace: Callable[[str], None] | None = None

    # -- building blocks -------------------------------------------------------------------------

    def _rms(self, x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
        # The fused CPU kernels are missing or crash on some CPUs; four plain ops are exact and cheap.
        xf = x.astype("float32")
        xf = xf * paddle.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return xf.astype(x.dtype) * w

    @staticmethod
    def _rotate(x: paddle.Tensor, cos: paddle.Tensor, sin: paddle.Tensor) -> paddle.Tensor:
        half = x.shape[-1] // 2
        rotated = paddle.concat([-x[..., half:], x[..., :half]], axis=-1)
        return x * cos + rotated * sin

    def _qkv(self, layer: LayerWeights, h: paddle.Tensor) -> tuple[paddle.Tensor, ...]:
        qkv = paddle.matmul(h, layer.qkv)  # [N, (nh + 2 kv) d]
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        q, k, v = paddle.split(qkv, [self.q_width, self.kv_width, self.kv_width], axis=-1)
        return q, k, v

    def _mlp(self, layer: LayerWeights, x: paddle.Tensor) -> paddle.Tensor:
        h = self._rms(x, layer.post_norm)
        return x + paddle.matmul(F.swiglu(paddle.matmul(h, layer.gate_up)), layer.down)

    def _logits(self, x: paddle.Tensor) -> np.ndarray:
        h = self._rms(x, self.w.norm)
        if self.trace:
            self.trace("norm")
        if self._host_lm_head is not None:
            logits = np.from_dlpack(h.contiguous()) @ self._host_lm_head  # [N, V] float32
        else:
            logits = paddle.matmul(h, self.w.lm_head).astype("float32").numpy()  # [N, V], copied to the host
        if self.trace:
            self.trace("lm_head")
        return logits

    # -- prefill ---------------------------------------------------------------------------------

    def prefill(
        self, cache: SlotKVCache, slot: int, tokens: np.ndarray, start: int, want_logits: bool
    ) -> np.ndarray | None:
        """Run prompt tokens [C] at positions start..start+C-1 of `slot`; logits [V] of the last one if asked."""
        cfg = self.cfg
        c = int(tokens.shape[0])
        end = start + c
        kv, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        cap = cache.capacity
        cos = self.cos[start:end].unsqueeze(1)  # [C, 1, d]
        sin = self.sin[start:end].unsqueeze(1)
        # Causal mask over the whole capacity: query i sees keys 0..start+i.
        keys = np.arange(cap)[None, :]
        allowed = keys <= (start + np.arange(c))[:, None]
        mask = paddle.to_tensor(np.where(allowed, 0.0, MASKED).astype(np.float32)).astype(self.dtype)  # [C, cap]
        x = F.embedding(paddle.to_tensor(tokens, dtype="int64"), self.w.embed)  # [C, H]
        for i, layer in enumerate(self.w.layers):
            h = self._rms(x, layer.input_norm)
            q, k, v = self._qkv(layer, h)
            q = self._rotate(q.reshape([c, cfg.num_heads, d]), cos, sin)  # [C, nh, d]
            k = self._rotate(k.reshape([c, kv, d]), cos, sin)  # [C, kv, d]
            v = v.reshape([c, kv, d])
            k_cache, v_cache = cache.layer(i)  # [slots, kv, cap, d]
            k_cache[slot, :, start:end] = k.transpose([1, 0, 2])
            v_cache[slot, :, start:end] = v.transpose([1, 0, 2])
            qg = q.transpose([1, 0, 2]).reshape([kv, g * c, d])  # [kv, g C, d]; no repeat_kv copy
            scores = paddle.matmul(qg, k_cache[slot], transpose_y=True) * self.scale  # [kv, g C, cap]
            scores = scores.reshape([kv, g, c, cap]) + mask
            probs = F.softmax(scores.astype("float32"), axis=-1).astype(self.dtype).reshape([kv, g * c, cap])
            out = paddle.matmul(probs, v_cache[slot])  # [kv, g C, d]
            out = out.reshape([cfg.num_heads, c, d]).transpose([1, 0, 2]).reshape([c, self.q_width])
            x = x + paddle.matmul(out, layer.o)
            x = self._mlp(layer, x)
        if not want_logits:
            return None
        return self._logits(x[-1:])[0]  # lm_head on the last position only: [V]

    # -- decode ----------------------------------------------------------------------------------

    def decode_step(self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of the B packed slots 0..B-1; returns logits [B, V] float32 on the host."""
        cfg = self.cfg
        b = int(tokens.shape[0])
        kv, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        cap = cache.capacity
        tr = self.trace
        pos = paddle.to_tensor(positions, dtype="int64")  # [B]
        cos = paddle.gather(self.cos, pos).unsqueeze(1)  # [B, 1, d]
        sin = paddle.gather(self.sin, pos).unsqueeze(1)
        mask_np = np.where(np.arange(cap)[None, :] <= positions[:, None], 0.0, MASKED).astype(np.float32)
        mask = paddle.to_tensor(mask_np).astype(self.dtype).reshape([b, 1, 1, cap])  # each slot sees its own length
        rows = cache.flat_rows(positions)  # [B kv] rows of the flattened [slots kv cap, d] cache
        x = F.embedding(paddle.to_tensor(tokens, dtype="int64"), self.w.embed)  # [B, H]
        if tr:
            tr("inputs")
        for i, layer in enumerate(self.w.layers):
            h = self._rms(x, layer.input_norm)
            if tr:
                tr("norm")
            q, k, v = self._qkv(layer, h)
            if tr:
                tr("qkv")
            q = self._rotate(q.reshape([b, cfg.num_heads, d]), cos, sin)  # [B, nh, d]
            k = self._rotate(k.reshape([b, kv, d]), cos, sin)  # [B, kv, d]
            if tr:
                tr("rotary")
            cache.write_rows(i, rows, k.reshape([b * kv, d]), v.reshape([b * kv, d]))  # in place, one row each
            if tr:
                tr("cache_write")
            k_cache, v_cache = cache.active(i, b)  # [B, kv, cap, d], views
            qg = q.reshape([b, kv, g, d])  # queries grouped under their kv head: no repeat_kv
            scores = paddle.matmul(qg, k_cache, transpose_y=True) * self.scale + mask  # [B, kv, g, cap]
            probs = F.softmax(scores.astype("float32"), axis=-1).astype(self.dtype)
            out = paddle.matmul(probs, v_cache).reshape([b, self.q_width])  # [B, nh d]
            if tr:
                tr("attention")
            x = x + paddle.matmul(out, layer.o)
            if tr:
                tr("o_proj")
            h = self._rms(x, layer.post_norm)
            if tr:
                tr("norm")
            gu = F.swiglu(paddle.matmul(h, layer.gate_up))
            if tr:
                tr("gate_up")
            x = x + paddle.matmul(gu, layer.down)
            if tr:
                tr("down")
        return self._logits(x)  # [B, V]
