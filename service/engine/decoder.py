"""A compact Llama-family decoder in Paddle over a slot KV cache.

Shapes: B active slots, C prompt tokens in a prefill chunk, H hidden, nh query heads, kv key/value heads,
g = nh // kv queries per key/value head, d head_dim, cap the cache's current capacity, V vocab.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm

from service.engine.attention import MASKED, Attention, AttentionPlan
from service.engine.checkpoints.model_config import DType, ModelConfig
from service.engine.kernels import PLAIN, Kernels
from service.engine.kv_cache import SlotKVCache

log = logging.getLogger("tokenstream.model")

T = TypeVar("T")


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [C] for positions start..start+C-1 of `slot`, run inside a step (LlamaDecoder.step)."""

    slot: int
    tokens: np.ndarray
    start: int
    want_logits: bool


@dataclass
class LayerWeights:
    input_norm: paddle.Tensor  # [H]
    qkv: paddle.Tensor  # [H, (nh + 2 kv) d], fused and pre-transposed for x @ W
    qkv_bias: paddle.Tensor | None  # [(nh + 2 kv) d]
    o: paddle.Tensor  # [nh d, H]
    post_norm: paddle.Tensor  # [H]
    gate_up: paddle.Tensor | None  # [H, 2 I], fused for swiglu; None once the decoder has split it
    down: paddle.Tensor  # [I, H]
    # gate_up's halves [H, I] as their own tensors, made by the decoder (which then drops gate_up): MKL runs
    # [B, H] x [H, 2I] as one matmul 1.1-1.2x slower than as two [H, I] ones at 8-32 rows (equal at one row).
    gate: paddle.Tensor | None = None
    up: paddle.Tensor | None = None


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


@dataclass(frozen=True)
class DecoderOptions:
    """The decoder's levers (bench/PROFILE.md): the engine sets threads (EngineConfig.decode_threads); the others only
    the benchmarks turn."""

    threads: int | None = None  # MKL and OpenMP threads, set per call; None: Paddle's own (one on CPU)
    lm_head: str = "auto"  # "auto", or one forced: "numpy", "paddle" (NN on the copy), "paddle_nt"
    split_gate_up: bool = True  # gate and up as two [H, I] matmuls (float32 only)
    true_lengths: bool = True  # decode rows attend over their own lengths where it pays (attention.py)


DEFAULT_OPTIONS = DecoderOptions()


@dataclass(slots=True, eq=False)
class _Pass:
    """One forward's tensors, handed from section to section. N rows: the B decode tokens, then the chunks'."""

    cache: SlotKVCache
    n: int
    cos: paddle.Tensor = field(init=False)  # [N, nh + kv, d], 1/sqrt(d) in the query heads' (step); [N, 1, d] (plain)
    sin: paddle.Tensor = field(init=False)  # the same; in the step rolled by d/2, the sign folded in
    rows: paddle.Tensor = field(init=False)  # [N kv] each (token, kv head)'s row in a layer's flat cache
    attention: AttentionPlan = field(init=False)  # the step's
    mask: paddle.Tensor = field(init=False)  # [B, 1, 1, cap] additive (plain)
    x: paddle.Tensor = field(init=False)  # [N, H] the residual stream
    h: paddle.Tensor = field(init=False)  # [N, H] normed: the next sublayer's input
    qk: paddle.Tensor = field(init=False)  # [N, (nh + kv) d] (step)
    q: paddle.Tensor = field(init=False)  # [N, nh, d]; in the step pre-scaled
    k: paddle.Tensor = field(init=False)  # [N, kv, d]
    v: paddle.Tensor = field(init=False)  # [N, kv d]
    out: paddle.Tensor = field(init=False)  # [N, nh d] the attention's output
    gu: paddle.Tensor = field(init=False)  # [N, I] the SwiGLU's output


Section = Callable[[_Pass, int, LayerWeights], None]  # one part of layer i's body, on the pass's tensors


class LlamaDecoder:
    """Llama, Qwen2, Mistral and ERNIE-4.5 dense share this forward: RMSNorm, RoPE, GQA and SwiGLU."""

    def __init__(
        self, cfg: ModelConfig, weights: ModelWeights, max_context: int, dtype: DType, kernels: Kernels = PLAIN,
        options: DecoderOptions = DEFAULT_OPTIONS,
    ) -> None:
        self.cfg = cfg
        self.w = weights
        self.dtype = dtype
        self.max_context = max_context
        self.options = options
        freqs = np.outer(np.arange(max_context, dtype=np.float64), rope_inv_freq(cfg))  # [T, d/2]
        emb = np.concatenate([freqs, freqs], axis=-1)  # [T, d]
        self.cos = paddle.to_tensor(np.cos(emb).astype(np.float32)).astype(dtype)  # [T, d]
        self.sin = paddle.to_tensor(np.sin(emb).astype(np.float32)).astype(dtype)  # [T, d]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.q_width = cfg.num_heads * cfg.head_dim
        self.kv_width = cfg.num_kv_heads * cfg.head_dim
        # The lm_head on CPU (bench/PROFILE.md): for 1-3 rows numpy's BLAS on the [H, V] copy, through a DLPack
        # view of Paddle's memory (Paddle's NN matmul ties with it, its NT one is 2x slower); from 4 rows, with
        # tied embeddings, Paddle's matmul against the embedding [V, H] itself (x @ E^T), which beat numpy by
        # 1.2-1.5x at 4-8 rows and 1.1x at 32, and Paddle's NN matmul by 1.4-1.7x. options.lm_head "auto" picks
        # so; the others force one.
        lm_head = options.lm_head
        on_cpu = weights.lm_head.place.is_cpu_place() and weights.lm_head.dtype == paddle.float32
        host = on_cpu and lm_head in ("auto", "numpy")
        self._host_lm_head = np.from_dlpack(weights.lm_head) if host else None  # [H, V]
        nt = lm_head == "paddle_nt" or (lm_head == "auto" and on_cpu)
        self._lm_head_nt_from = (1 if lm_head == "paddle_nt" else 4) if nt and cfg.tie_word_embeddings else 1 << 30
        # The profiling hook (bench/profile_step.py): called with a section's name when that section ends (_section).
        self.trace: Callable[[str], None] | None = None
        # RoPE as a roll by d/2 (rotate-half with the sign folded into sin), and 1/sqrt(d) folded into the query
        # rows of cos and sin: q and k rotate in one go and q comes out scaled.
        half = cfg.head_dim // 2
        self.sin_rolled = paddle.concat([-self.sin[:, :half], self.sin[:, half:]], axis=-1)  # [T, d]
        qk_scale = np.array([self.scale] * cfg.num_heads + [1.0] * cfg.num_kv_heads, dtype=np.float32)
        self.qk_scale = paddle.to_tensor(qk_scale.reshape(1, -1, 1)).astype(dtype)  # [1, nh + kv, 1]
        self.attention = Attention(cfg, options.true_lengths)
        # The one-forward step (step()) serves float32, with or without the fused kernels; half precision takes the
        # plain forwards. Optional fused kernels only where kernels.py proved them in a child process (a kernel built
        # for AVX-512 kills the process on a CPU without it), and float32 only: Paddle's CPU kernels are.
        self.fast = dtype == "float32"
        self.kernels = kernels if self.fast else PLAIN
        self.split_gate_up = self.fast and options.split_gate_up
        if self.split_gate_up:
            for layer in weights.layers:
                if layer.gate is None or layer.up is None:
                    assert layer.gate_up is not None
                    inter = layer.gate_up.shape[1] // 2
                    layer.gate, layer.up = layer.gate_up[:, :inter].contiguous(), layer.gate_up[:, inter:].contiguous()
                    layer.gate_up = None  # the split path never reads it: keep one copy of the weights
        # Each forward's layer body, as named sections (the names the profiling hook hears).
        self._step_layer: tuple[tuple[str, Section], ...] = (
            ("qkv", self._qkv_rows), ("rotary", self._rotary), ("cache_write", self._cache_write),
            ("attention", self._attention), ("o_proj", self._o_proj), ("gate_up", self._gate_up), ("down", self._down),
        )
        self._plain_layer: tuple[tuple[str, Section], ...] = (
            ("norm", self._plain_input_norm), ("qkv", self._plain_qkv), ("rotary", self._plain_rotary),
            ("cache_write", self._cache_write), ("attention", self._plain_attention), ("o_proj", self._plain_o_proj),
            ("norm", self._plain_post_norm), ("gate_up", self._gate_up), ("down", self._plain_down),
        )

    # -- the engine's entry points ---------------------------------------------------------------

    def prefill(
        self, cache: SlotKVCache, slot: int, tokens: np.ndarray, start: int, want_logits: bool
    ) -> np.ndarray | None:
        """Run prompt tokens [C] at positions start..start+C-1 of `slot`; logits [V] of the last one if asked."""
        if not self.fast:
            return self.prefill_plain(cache, slot, tokens, start, want_logits)
        _, chunk_logits = self.step(cache, _NO_TOKENS, _NO_TOKENS, [PrefillChunk(slot, tokens, start, want_logits)])
        return chunk_logits[0]

    def decode_step(self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """One token for each of the B packed slots 0..B-1; returns logits [B, V] float32 on the host."""
        if not self.fast:
            self._use_threads()
            return self.decode_step_plain(cache, tokens, positions)
        logits, _ = self.step(cache, tokens, positions)
        assert logits is not None
        return logits

    def step(
        self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray, chunks: Sequence[PrefillChunk] = ()
    ) -> tuple[np.ndarray | None, list[np.ndarray | None]]:
        """One forward over B decode rows (slots 0..B-1, one token each at `positions`) and any prompt chunks (each
        in its own slot, outside 0..B-1), sharing every weight read: one matmul per projection for all rows.

        Returns (logits [B, V] of the decode rows or None when B = 0, per chunk its last position's logits [V] if
        it asked for them, else None). The cache must hold every position written (cache.capacity).
        """
        self._use_threads()
        if not self.fast:  # half precision: the same results, one call per part
            per_chunk = [self.prefill_plain(cache, c.slot, c.tokens, c.start, c.want_logits) for c in chunks]
            return (self.decode_step_plain(cache, tokens, positions) if len(tokens) else None), per_chunk
        s = self._section("inputs", self._step_inputs, cache, tokens, positions, chunks)
        self._layers(self._step_layer, s)
        # The lm_head only for the rows that need logits: all decode rows, the last row of chunks that ask.
        b = int(tokens.shape[0])
        wanted = list(range(b))
        ends = np.cumsum([b] + [len(c.tokens) for c in chunks])[1:] - 1
        wanted += [int(e) for e, c in zip(ends, chunks, strict=True) if c.want_logits]
        if not wanted:
            return None, [None] * len(chunks)
        h = s.h  # [N, H], final-normed
        if len(wanted) < s.n:
            h = paddle.gather(h, paddle.to_tensor(np.array(wanted, dtype=np.int64)))
        logits = self._head(h)
        chunk_logits: list[np.ndarray | None] = []
        j = b
        for c in chunks:
            chunk_logits.append(logits[j] if c.want_logits else None)
            j += int(c.want_logits)
        return (logits[:b] if b else None), chunk_logits

    # -- sections, and the profiling hook --------------------------------------------------------

    def _section(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """Run one section of a forward, then the profiling hook: trace(name) when one is set."""
        out = fn(*args)
        if self.trace is not None:
            self.trace(name)
        return out

    def _layers(self, sections: tuple[tuple[str, Section], ...], s: _Pass) -> None:
        """Every layer in turn, each as its sections in order, each followed by the profiling hook (as _section,
        inlined: this loop runs ~8 sections x layers per step)."""
        tr = self.trace
        for i, layer in enumerate(self.w.layers):
            for name, section in sections:
                section(s, i, layer)
                if tr is not None:
                    tr(name)

    def _step_inputs(
        self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray, chunks: Sequence[PrefillChunk]
    ) -> _Pass:
        """The step's rows: the B decode tokens, then each chunk's; their RoPE, cache rows and attention plan, and
        the first layer's normed input."""
        b = int(tokens.shape[0])
        if chunks:
            all_tokens = np.concatenate([tokens, *(c.tokens for c in chunks)]).astype(np.int64)
            all_pos = np.concatenate([positions, *(np.arange(c.start, c.start + len(c.tokens)) for c in chunks)])
            slots = np.concatenate([np.arange(b), *(np.full(len(c.tokens), c.slot) for c in chunks)])
        else:
            all_tokens, all_pos, slots = tokens, positions, np.arange(b)
        top = max(b, max((c.slot + 1 for c in chunks), default=0))
        if top > cache.slots:
            raise ValueError(f"the step uses slot {top - 1} but the cache has {cache.slots} allocated; call "
                             "cache.ensure(longest, used_slots) first")
        s = _Pass(cache, int(all_tokens.shape[0]))
        pos = paddle.to_tensor(all_pos, dtype="int64")  # [N]
        s.cos = paddle.gather(self.cos, pos).unsqueeze(1) * self.qk_scale  # [N, nh + kv, d]
        s.sin = paddle.gather(self.sin_rolled, pos).unsqueeze(1) * self.qk_scale
        s.rows = cache.rows(slots, all_pos)  # [N kv]
        s.attention = self.attention.plan(cache, positions, [(c.slot, c.start, len(c.tokens)) for c in chunks])
        s.x = F.embedding(paddle.to_tensor(all_tokens, dtype="int64"), self.w.embed)  # [N, H]
        s.h = self._norm(s.x, self.w.layers[0].input_norm)
        return s

    def _qkv_rows(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        qkv = paddle.matmul(s.h, layer.qkv)  # [N, (nh + 2 kv) d]
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        s.qk, s.v = paddle.split(qkv, [self.q_width + self.kv_width, self.kv_width], axis=-1)

    def _rotary(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        nh, kv, d = self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim
        qk = s.qk.reshape([s.n, nh + kv, d])
        qk = qk * s.cos + paddle.roll(qk, d // 2, axis=-1) * s.sin
        s.q, s.k = paddle.split(qk, [nh, kv], axis=1)  # [N, nh, d] (scaled), [N, kv, d]

    def _cache_write(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        rows, d = s.n * self.cfg.num_kv_heads, self.cfg.head_dim
        s.cache.write_rows(i, s.rows, s.k.reshape([rows, d]), s.v.reshape([rows, d]))  # in place

    def _attention(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.out = s.attention.layer(i, s.q)  # [N, nh d]

    def _o_proj(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.h, s.x = self._add_norm(paddle.matmul(s.out, layer.o), s.x, layer.post_norm)

    def _gate_up(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.gu = self._swiglu(layer, s.h)

    def _down(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        layers = self.w.layers
        norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
        s.h, s.x = self._add_norm(paddle.matmul(s.gu, layer.down), s.x, norm)

    # -- building blocks -------------------------------------------------------------------------

    def _use_threads(self) -> None:
        """Apply options.threads to MKL and OpenMP, per call: OpenMP's count is per calling thread (~1 us)."""
        if self.options.threads is not None:
            paddle.base.core.set_num_threads(self.options.threads)

    def _head(self, h: paddle.Tensor) -> np.ndarray:
        """logits [N, V] float32 on the host from final-normed hidden states [N, H]."""
        return self._section("lm_head", self._lm_head, h)

    def _lm_head(self, h: paddle.Tensor) -> np.ndarray:
        if int(h.shape[0]) >= self._lm_head_nt_from:
            return paddle.matmul(h, self.w.embed, transpose_y=True).numpy()
        if self._host_lm_head is not None:
            return np.from_dlpack(h.contiguous()) @ self._host_lm_head
        return paddle.matmul(h, self.w.lm_head).astype("float32").numpy()

    def _norm(self, x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
        """RMSNorm of x [N, H] in float32 (the step's dtype), times w [H]."""
        if self.kernels.fused_rms_norm:
            return fused_rms_norm(x, w, None, self.cfg.rms_norm_eps, 1)[0]
        return x * paddle.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.rms_norm_eps) * w

    def _add_norm(self, y: paddle.Tensor, x: paddle.Tensor, w: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """(norm(x + y) w, x + y): a sublayer's output y [N, H] joins the residual stream x, then the next norm."""
        if self.kernels.fused_rms_norm:  # one op for both
            return fused_rms_norm(y, w, None, self.cfg.rms_norm_eps, 1, residual=x)
        x = x + y
        return self._norm(x, w), x

    def _swiglu(self, layer: LayerWeights, h: paddle.Tensor) -> paddle.Tensor:
        """silu(h gate) * (h up): [N, I]. Split weights where a float32 decoder split them (also for the plain paths
        on the same weights)."""
        if layer.gate_up is None:
            gate, up = paddle.matmul(h, layer.gate), paddle.matmul(h, layer.up)
        elif self.kernels.swiglu:
            return F.swiglu(paddle.matmul(h, layer.gate_up))
        else:
            gate, up = paddle.split(paddle.matmul(h, layer.gate_up), 2, axis=-1)
        return F.swiglu(gate, up) if self.kernels.swiglu else F.silu(gate) * up

    # -- the plain forward: half precision, and the reference ------------------------------------

    def _rms(self, x: paddle.Tensor, w: paddle.Tensor) -> paddle.Tensor:
        # Four plain ops, exact in any dtype (the fused kernel is float32-only on CPU).
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
        return x + paddle.matmul(self._swiglu(layer, self._rms(x, layer.post_norm)), layer.down)

    def _logits(self, x: paddle.Tensor) -> np.ndarray:
        return self._head(self._section("norm", self._rms, x, self.w.norm))

    def prefill_plain(
        self, cache: SlotKVCache, slot: int, tokens: np.ndarray, start: int, want_logits: bool
    ) -> np.ndarray | None:
        """prefill op by op as first written: the reference for `step`, and the path for half precision."""
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

    def decode_step_plain(self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """decode_step op by op as first written (~48 ops per layer): the reference for `step`, and the path for
        half precision."""
        s = self._section("inputs", self._plain_inputs, cache, tokens, positions)
        self._layers(self._plain_layer, s)
        return self._logits(s.x)  # [B, V]

    def _plain_inputs(self, cache: SlotKVCache, tokens: np.ndarray, positions: np.ndarray) -> _Pass:
        b, cap = int(tokens.shape[0]), cache.capacity
        s = _Pass(cache, b)
        pos = paddle.to_tensor(positions, dtype="int64")  # [B]
        s.cos = paddle.gather(self.cos, pos).unsqueeze(1)  # [B, 1, d]
        s.sin = paddle.gather(self.sin, pos).unsqueeze(1)
        mask_np = np.where(np.arange(cap)[None, :] <= positions[:, None], 0.0, MASKED).astype(np.float32)
        s.mask = paddle.to_tensor(mask_np).astype(self.dtype).reshape([b, 1, 1, cap])  # each slot sees its own length
        s.rows = cache.flat_rows(positions)  # [B kv] rows of the flattened [slots kv cap, d] cache
        s.x = F.embedding(paddle.to_tensor(tokens, dtype="int64"), self.w.embed)  # [B, H]
        return s

    def _plain_input_norm(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.h = self._rms(s.x, layer.input_norm)

    def _plain_qkv(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.q, s.k, s.v = self._qkv(layer, s.h)

    def _plain_rotary(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        b, d = s.n, self.cfg.head_dim
        s.q = self._rotate(s.q.reshape([b, self.cfg.num_heads, d]), s.cos, s.sin)  # [B, nh, d]
        s.k = self._rotate(s.k.reshape([b, self.cfg.num_kv_heads, d]), s.cos, s.sin)  # [B, kv, d]

    def _plain_attention(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        cfg, b = self.cfg, s.n
        k_cache, v_cache = s.cache.active(i, b)  # [B, kv, cap, d], views
        qg = s.q.reshape([b, cfg.num_kv_heads, cfg.group_size, cfg.head_dim])  # grouped under their kv head
        scores = paddle.matmul(qg, k_cache, transpose_y=True) * self.scale + s.mask  # [B, kv, g, cap]
        probs = F.softmax(scores.astype("float32"), axis=-1).astype(self.dtype)
        s.out = paddle.matmul(probs, v_cache).reshape([b, self.q_width])  # [B, nh d]

    def _plain_o_proj(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.x = s.x + paddle.matmul(s.out, layer.o)

    def _plain_post_norm(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.h = self._rms(s.x, layer.post_norm)

    def _plain_down(self, s: _Pass, i: int, layer: LayerWeights) -> None:
        s.x = s.x + paddle.matmul(s.gu, layer.down)


_NO_TOKENS = np.zeros(0, dtype=np.int64)
