"""A compact Llama-family decoder in Paddle over a slot KV cache.

Shapes: B active slots, C prompt tokens in a prefill chunk, H hidden, nh query heads, kv key/value heads,
g = nh // kv queries per key/value head, d head_dim, cap the cache's current capacity, V vocab.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm

from service.engine.checkpoints.model_config import DType, ModelConfig
from service.engine.kernels import PLAIN, Kernels
from service.engine.kv_cache import SlotKVCache

log = logging.getLogger("tokenstream.model")

MASKED = -1e30  # additive mask; -inf can turn a fully masked row into NaN
KEY_BLOCK = 32  # positions per gathered block of a row's keys (attention over the true lengths)


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [C] for positions start..start+C-1 of `slot`, run inside a step (LlamaDecoder.step)."""

    slot: int
    tokens: np.ndarray
    start: int
    want_logits: bool


@dataclass(frozen=True)
class RowGroup:
    """Decode rows that attend over their slots' first `span` positions (LlamaDecoder._decode_groups)."""

    rows: paddle.Tensor | None  # [n] int64, the rows' places in the batch; None: all B rows in order
    blocks: paddle.Tensor | None  # [n kv span/KEY_BLOCK] int64 key blocks to gather; None: the cache views, span cap
    mask: paddle.Tensor  # [n, kv, g, span] additive


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


class LlamaDecoder:
    """Llama, Qwen2, Mistral and ERNIE-4.5 dense share this forward: RMSNorm, RoPE, GQA and SwiGLU."""

    def __init__(
        self, cfg: ModelConfig, weights: ModelWeights, max_context: int, dtype: DType, kernels: Kernels = PLAIN,
        threads: int | None = None, lm_head: str = "auto", split_gate_up: bool = True, true_lengths: bool = True,
    ) -> None:
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
        # The lm_head on CPU (bench/PROFILE.md): for 1-3 rows numpy's BLAS on the [H, V] copy, through a DLPack
        # view of Paddle's memory (Paddle's NN matmul ties with it, its NT one is 2x slower); from 4 rows, with
        # tied embeddings, Paddle's matmul against the embedding [V, H] itself (x @ E^T), which beat numpy by
        # 1.2-1.5x at 4-8 rows and 1.1x at 32, and Paddle's NN matmul by 1.4-1.7x. lm_head: "auto" picks so;
        # "numpy", "paddle" (NN on the copy) and "paddle_nt" force one.
        on_cpu = weights.lm_head.place.is_cpu_place() and weights.lm_head.dtype == paddle.float32
        host = on_cpu and lm_head in ("auto", "numpy")
        self._host_lm_head = np.from_dlpack(weights.lm_head) if host else None  # [H, V]
        nt = lm_head == "paddle_nt" or (lm_head == "auto" and on_cpu)
        self._lm_head_nt_from = (1 if lm_head == "paddle_nt" else 4) if nt and cfg.tie_word_embeddings else 1 << 30
        # Paddle runs its CPU matmuls on one thread unless told otherwise (FLAGS_paddle_num_threads = 1).
        self.threads = threads
        # Profiling hook (bench/profile_step.py): called with a section's name when that section ends.
        self.trace: Callable[[str], None] | None = None
        # RoPE as a roll by d/2 (rotate-half with the sign folded into sin), and 1/sqrt(d) folded into the query
        # rows of cos and sin: q and k rotate in one go and q comes out scaled.
        half = cfg.head_dim // 2
        self.sin_rolled = paddle.concat([-self.sin[:, :half], self.sin[:, half:]], axis=-1)  # [T, d]
        qk_scale = np.array([self.scale] * cfg.num_heads + [1.0] * cfg.num_kv_heads, dtype=np.float32)
        self.qk_scale = paddle.to_tensor(qk_scale.reshape(1, -1, 1)).astype(dtype)  # [1, nh + kv, 1]
        self._views: tuple[object, ...] = ()  # (cache, generation, B) of the views below
        self._view_lists: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])
        self._blocks: tuple[object, ...] = ()  # (cache, generation) of the block views below
        self._block_lists: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])
        # Decode rows attend over their own lengths (rounded up to KEY_BLOCK) when the cost model below says so,
        # instead of every row over the capacity the longest row set (bench/PROFILE.md, bench/levers/true_lengths.py).
        self.true_lengths = true_lengths
        # The one-forward step (step()) serves float32, with or without the fused kernels; half precision takes the
        # plain forwards. Optional fused kernels only where kernels.py proved them in a child process (a kernel built
        # for AVX-512 kills the process on a CPU without it), and float32 only: Paddle's CPU kernels are.
        self.fast = dtype == "float32"
        self.kernels = kernels if self.fast else PLAIN
        self.split_gate_up = self.fast and split_gate_up
        if self.split_gate_up:
            for layer in weights.layers:
                if layer.gate is None or layer.up is None:
                    assert layer.gate_up is not None
                    inter = layer.gate_up.shape[1] // 2
                    layer.gate, layer.up = layer.gate_up[:, :inter].contiguous(), layer.gate_up[:, inter:].contiguous()
                    layer.gate_up = None  # the split path never reads it: keep one copy of the weights

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
        if not self.fast:  # half precision: the same results, one call per part
            self._use_threads()
            per_chunk = [self.prefill_plain(cache, c.slot, c.tokens, c.start, c.want_logits) for c in chunks]
            return (self.decode_step_plain(cache, tokens, positions) if len(tokens) else None), per_chunk
        self._use_threads()
        cfg = self.cfg
        b = int(tokens.shape[0])
        nh, kv, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        tr = self.trace
        cap = cache.capacity
        # Rows: the B decode tokens, then each chunk's tokens. Their slots and positions, for RoPE and the cache.
        if chunks:
            all_tokens = np.concatenate([tokens, *(c.tokens for c in chunks)]).astype(np.int64)
            all_pos = np.concatenate([positions, *(np.arange(c.start, c.start + len(c.tokens)) for c in chunks)])
            slots = np.concatenate([np.arange(b), *(np.full(len(c.tokens), c.slot) for c in chunks)])
        else:
            all_tokens, all_pos, slots = tokens, positions, np.arange(b)
        n = int(all_tokens.shape[0])
        top = max(b, max((c.slot + 1 for c in chunks), default=0))
        if top > cache.slots:
            raise ValueError(f"the step uses slot {top - 1} but the cache has {cache.slots} allocated; call "
                             "cache.ensure(longest, used_slots) first")
        pos = paddle.to_tensor(all_pos, dtype="int64")  # [N]
        cos = paddle.gather(self.cos, pos).unsqueeze(1) * self.qk_scale  # [N, nh + kv, d]
        sin = paddle.gather(self.sin_rolled, pos).unsqueeze(1) * self.qk_scale
        rows = cache.rows(slots, all_pos)  # [N kv] rows of each (token, kv head) in a layer's flat cache
        # Masks at the full shape of the scores they are added to: Paddle's CPU add with broadcasting took 244 us
        # for [32, 3, 3, 128] + [32, 1, 1, 128], a same-shape add 7 us.
        keys = np.arange(cap)[None, :]
        k_blocks: list[paddle.Tensor] = []
        v_blocks: list[paddle.Tensor] = []
        if b:  # each decode row sees its own slot's positions 0..pos
            groups, order = self._decode_groups(cache, positions)
            k_views, v_views = self._active_views(cache, b)
            if any(gr.blocks is not None for gr in groups):
                k_blocks, v_blocks = self._block_views(cache)
        chunk_masks = []
        for c in chunks:  # causal over the slot: query j sees positions 0..start+j
            allowed = keys <= (c.start + np.arange(len(c.tokens)))[:, None]  # [C, cap]
            chunk_masks.append(self._mask(allowed, (kv, g, len(c.tokens), cap)))
        layers = self.w.layers
        x = F.embedding(paddle.to_tensor(all_tokens, dtype="int64"), self.w.embed)  # [N, H], the residual stream
        h = self._norm(x, layers[0].input_norm)
        if tr:
            tr("inputs")
        for i, layer in enumerate(layers):
            qkv = paddle.matmul(h, layer.qkv)  # [N, (nh + 2 kv) d]
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            qk, v = paddle.split(qkv, [self.q_width + self.kv_width, self.kv_width], axis=-1)
            if tr:
                tr("qkv")
            qk = qk.reshape([n, nh + kv, d])
            qk = qk * cos + paddle.roll(qk, d // 2, axis=-1) * sin
            q, k = paddle.split(qk, [nh, kv], axis=1)  # [N, nh, d] (scaled), [N, kv, d]
            if tr:
                tr("rotary")
            cache.write_rows(i, rows, k.reshape([n * kv, d]), v.reshape([n * kv, d]))  # in place
            if tr:
                tr("cache_write")
            outs = []
            if b:
                qd = (q[:b] if chunks else q).reshape([b, kv, g, d])  # queries grouped under their kv head
                kb, vb = (k_blocks[i], v_blocks[i]) if k_blocks else (None, None)
                outs.append(self._decode_attention(qd, k_views[i], v_views[i], kb, vb, groups, order))
            r = b
            for c, mask in zip(chunks, chunk_masks, strict=True):
                outs.append(self._chunk_attention(cache, i, c.slot, q[r:r + len(c.tokens)], mask))
                r += len(c.tokens)
            out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)  # [N, nh d]
            if tr:
                tr("attention")
            h, x = self._add_norm(paddle.matmul(out, layer.o), x, layer.post_norm)
            if tr:
                tr("o_proj")
            gu = self._swiglu(layer, h)
            if tr:
                tr("gate_up")
            norm = layers[i + 1].input_norm if i + 1 < len(layers) else self.w.norm
            h, x = self._add_norm(paddle.matmul(gu, layer.down), x, norm)
            if tr:
                tr("down")
        # The lm_head only for the rows that need logits: all decode rows, the last row of chunks that ask.
        wanted = list(range(b))
        ends = np.cumsum([b] + [len(c.tokens) for c in chunks])[1:] - 1
        wanted += [int(e) for e, c in zip(ends, chunks, strict=True) if c.want_logits]
        if not wanted:
            return None, [None] * len(chunks)
        if len(wanted) < n:
            h = paddle.gather(h, paddle.to_tensor(np.array(wanted, dtype=np.int64)))
        logits = self._head(h)
        chunk_logits: list[np.ndarray | None] = []
        j = b
        for c in chunks:
            chunk_logits.append(logits[j] if c.want_logits else None)
            j += int(c.want_logits)
        return (logits[:b] if b else None), chunk_logits

    # -- building blocks -------------------------------------------------------------------------

    # The cost model of _decode_groups, in units of one row attending over one position of the cache in place.
    # bench/levers/true_lengths.py: a gathered position costs 1.2-1.6 of those in one layer (the gather reads and
    # writes it), and in the whole step gathering 160 of 256 positions for 32 uniform rows gave 0.97-1.08x, within
    # the noise: 1.5 gathers only where the step gains clearly. Each group adds ~8 ops per layer, ~512 positions'
    # worth at B=32.
    GATHER_COST = 1.5
    GROUP_COST = 512.0

    def _decode_groups(
        self, cache: SlotKVCache, positions: np.ndarray
    ) -> tuple[list[RowGroup], paddle.Tensor | None]:
        """Split the B decode rows into at most two groups: the shortest k over their longest length rounded up to
        KEY_BLOCK (keys gathered into a compact copy), and the rest over the whole capacity. Why: the capacity is
        a bucket above the longest row, so one long row makes every short one attend (and read K/V) over it.
        Returns the groups and `order` [B] (each row's place in the groups' concatenated output; None: in order).
        """
        kv, g = self.cfg.num_kv_heads, self.cfg.group_size
        cap, b = cache.capacity, int(positions.shape[0])
        allowed = np.arange(cap)[None, :] <= positions[:, None]  # [B, cap]
        if not self.true_lengths or cap % KEY_BLOCK:
            return [RowGroup(None, None, self._mask(allowed[:, None, None, :], (b, kv, g, cap)))], None
        by_len = np.argsort(positions, kind="stable")  # [B] rows, shortest first
        spans = (positions[by_len] // KEY_BLOCK + 1) * KEY_BLOCK  # [B] each row's length rounded up to a block
        k = np.arange(1, b + 1)  # [B] split after the k shortest rows
        cost = self.GATHER_COST * (k * spans + (b - k) * cap) + self.GROUP_COST * (1 + (k < b))
        best = int(np.argmin(cost))
        if cost[best] >= b * cap:
            return [RowGroup(None, None, self._mask(allowed[:, None, None, :], (b, kv, g, cap)))], None
        groups = []
        for rows, span in ((by_len[:best + 1], int(spans[best])), (by_len[best + 1:], cap)):
            if len(rows):
                groups.append(self._gathered_group(cache, rows, positions[rows], span))
        order = np.empty(b, dtype=np.int64)
        order[by_len] = np.arange(b)
        in_order = bool((by_len == np.arange(b)).all())
        return groups, None if in_order else paddle.to_tensor(order)

    def _gathered_group(self, cache: SlotKVCache, rows: np.ndarray, positions: np.ndarray, span: int) -> RowGroup:
        """A group of rows [n] (slots = rows) attending over their first `span` positions, gathered by block."""
        kv, g = self.cfg.num_kv_heads, self.cfg.group_size
        per_slot = cache.capacity // KEY_BLOCK
        slot_head = rows.astype(np.int64)[:, None] * kv + np.arange(kv)  # [n, kv]
        blocks = slot_head[:, :, None] * per_slot + np.arange(span // KEY_BLOCK)  # [n, kv, span/KEY_BLOCK]
        allowed = np.arange(span)[None, :] <= positions[:, None]  # [n, span]
        mask = self._mask(allowed[:, None, None, :], (len(rows), kv, g, span))
        return RowGroup(paddle.to_tensor(rows.astype(np.int64)), paddle.to_tensor(blocks.reshape(-1)), mask)

    def _decode_attention(
        self, q: paddle.Tensor, k_view: paddle.Tensor, v_view: paddle.Tensor, k_blocks: paddle.Tensor | None,
        v_blocks: paddle.Tensor | None, groups: list[RowGroup], order: paddle.Tensor | None,
    ) -> paddle.Tensor:
        """Attention of the decode rows' queries q [B, kv, g, d] (pre-scaled), one layer: [B, nh d].
        k_view, v_view: [B, kv, cap, d] the slots' caches; k_blocks, v_blocks: [slots kv cap/KEY_BLOCK, KEY_BLOCK d]
        the same layer cut into blocks, for the groups that gather."""
        kv, d = self.cfg.num_kv_heads, self.cfg.head_dim
        outs = []
        for gr in groups:
            if gr.blocks is None:  # over the whole capacity, on the cache itself
                qg, k, v = q, k_view, v_view
            else:  # gathering whole blocks: 2-5x faster than the strided copy matmul makes of k_view[:, :, :span]
                assert k_blocks is not None
                assert v_blocks is not None
                assert gr.rows is not None
                n, span = int(gr.mask.shape[0]), int(gr.mask.shape[-1])
                qg = paddle.gather(q, gr.rows)  # [n, kv, g, d]
                k = paddle.gather(k_blocks, gr.blocks).reshape([n, kv, span, d])
                v = paddle.gather(v_blocks, gr.blocks).reshape([n, kv, span, d])
            scores = paddle.matmul(qg, k, transpose_y=True) + gr.mask  # [n, kv, g, span]
            outs.append(paddle.matmul(F.softmax(scores, axis=-1), v).reshape([-1, self.q_width]))
        out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)  # [B, nh d], in the groups' order
        return out if order is None else paddle.gather(out, order)

    def _chunk_attention(
        self, cache: SlotKVCache, i: int, slot: int, q: paddle.Tensor, mask: paddle.Tensor
    ) -> paddle.Tensor:
        """Attention of a chunk's C queries [C, nh, d] (pre-scaled) over its slot's cache: [C, nh d]."""
        cfg = self.cfg
        c = int(q.shape[0])
        kv, g, d, cap = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cache.capacity
        k_cache, v_cache = cache.layer(i)  # [slots, kv, cap, d]
        qg = q.transpose([1, 0, 2]).reshape([kv, g * c, d])  # [kv, g C, d]; no repeat_kv copy
        scores = paddle.matmul(qg, k_cache[slot], transpose_y=True).reshape([kv, g, c, cap]) + mask
        probs = F.softmax(scores, axis=-1).reshape([kv, g * c, cap])
        out = paddle.matmul(probs, v_cache[slot])  # [kv, g C, d]
        return out.reshape([cfg.num_heads, c, d]).transpose([1, 0, 2]).reshape([c, self.q_width])

    @staticmethod
    def _mask(allowed: np.ndarray, shape: tuple[int, ...]) -> paddle.Tensor:
        """Additive float32 mask (0 where allowed) materialized at `shape`, the scores' own."""
        return paddle.to_tensor(np.where(np.broadcast_to(allowed, shape), np.float32(0.0), np.float32(MASKED)))

    def _use_threads(self) -> None:
        """Apply `threads` to MKL and OpenMP, per call: OpenMP's count is per calling thread, and it costs ~1 us."""
        if self.threads is not None:
            paddle.base.core.set_num_threads(self.threads)

    def _active_views(self, cache: SlotKVCache, b: int) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        """Each layer's K and V views of slots 0..B-1, made once per (cache storage, B): slicing is an op too."""
        key = (cache, cache.generation, b)
        if key != self._views:
            views = [cache.active(i, b) for i in range(self.cfg.num_layers)]
            self._view_lists = ([k for k, _ in views], [v for _, v in views])
            self._views = key
        return self._view_lists

    def _block_views(self, cache: SlotKVCache) -> tuple[list[paddle.Tensor], list[paddle.Tensor]]:
        """Each layer's K and V as [slots kv cap/KEY_BLOCK, KEY_BLOCK d] views, made once per cache storage."""
        key = (cache, cache.generation)
        if key != self._blocks:
            width = KEY_BLOCK * self.cfg.head_dim
            views = [cache.layer(i) for i in range(self.cfg.num_layers)]
            self._block_lists = ([k.reshape([-1, width]) for k, _ in views], [v.reshape([-1, width]) for _, v in views])
            self._blocks = key
        return self._block_lists

    def _head(self, h: paddle.Tensor) -> np.ndarray:
        """logits [N, V] float32 on the host from final-normed hidden states [N, H]."""
        if int(h.shape[0]) >= self._lm_head_nt_from:
            logits = paddle.matmul(h, self.w.embed, transpose_y=True).numpy()
        elif self._host_lm_head is not None:
            logits = np.from_dlpack(h.contiguous()) @ self._host_lm_head
        else:
            logits = paddle.matmul(h, self.w.lm_head).astype("float32").numpy()
        if self.trace:
            self.trace("lm_head")
        return logits

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

    def _logits(self, x: paddle.Tensor) -> np.ndarray:
        h = self._rms(x, self.w.norm)
        if self.trace:
            self.trace("norm")
        return self._head(h)

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
            gu = self._swiglu(layer, h)
            if tr:
                tr("gate_up")
            x = x + paddle.matmul(gu, layer.down)
            if tr:
                tr("down")
        return self._logits(x)  # [B, V]


_NO_TOKENS = np.zeros(0, dtype=np.int64)
