"""The one-forward step's attention over the slot KV cache: decode rows grouped by length, prompt chunks causal.

Shapes as in decoder.py: B decode rows, C a chunk's tokens, N all the step's rows, nh query heads, kv key/value
heads, g = nh // kv, d head_dim, cap the cache's current capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.nn.functional as F

from service.engine.checkpoints.model_config import ModelConfig
from service.engine.kv_cache import SlotKVCache

MASKED = -1e30  # additive mask; -inf can turn a fully masked row into NaN
KEY_BLOCK = 32  # positions per gathered block of a row's keys (attention over the true lengths)


@dataclass(frozen=True)
class RowGroup:
    """Decode rows that attend over their slots' first `span` positions (Attention.decode_groups)."""

    rows: paddle.Tensor | None  # [n] int64, the rows' places in the batch; None: all B rows in order
    blocks: paddle.Tensor | None  # [n kv span/KEY_BLOCK] int64 key blocks to gather; None: the cache views, span cap
    mask: paddle.Tensor  # [n, kv, g, span] additive


class Attention:
    """A decoder's attention: its cost model for grouping decode rows, and its views of the cache, kept between
    steps. `plan` makes each step's AttentionPlan, which every layer then runs."""

    # The cost model of decode_groups, in units of one row attending over one position of the cache in place.
    # bench/levers/true_lengths.py: a gathered position costs 1.2-1.6 of those in one layer (the gather reads and
    # writes it), and in the whole step gathering 160 of 256 positions for 32 uniform rows gave 0.97-1.08x, within
    # the noise: 1.5 gathers only where the step gains clearly. Each group adds ~8 ops per layer, ~512 positions'
    # worth at B=32.
    GATHER_COST = 1.5
    GROUP_COST = 512.0

    def __init__(self, cfg: ModelConfig, true_lengths: bool = True) -> None:
        self.cfg = cfg
        # Decode rows attend over their own lengths (rounded up to KEY_BLOCK) when the cost model says so, instead
        # of every row over the capacity the longest row set (bench/PROFILE.md, bench/levers/true_lengths.py).
        self.true_lengths = true_lengths
        self._views: tuple[object, ...] = ()  # (cache, generation, B) of the views below
        self._view_lists: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])
        self._blocks: tuple[object, ...] = ()  # (cache, generation) of the block views below
        self._block_lists: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])

    def plan(self, cache: SlotKVCache, positions: np.ndarray, chunks: Sequence[tuple[int, int, int]]) -> AttentionPlan:
        """This step's attention: B decode rows at `positions` [B] (slots 0..B-1), then the prompt chunks, each
        (slot, start, C): query j of a chunk sees its slot's positions 0..start+j."""
        cfg, cap, b = self.cfg, cache.capacity, int(positions.shape[0])
        groups: list[RowGroup] = []
        order = None
        views: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])
        blocks: tuple[list[paddle.Tensor], list[paddle.Tensor]] = ([], [])
        if b:  # each decode row sees its own slot's positions 0..pos
            groups, order = self.decode_groups(cache, positions)
            views = self._active_views(cache, b)
            if any(gr.blocks is not None for gr in groups):
                blocks = self._block_views(cache)
        chunk_masks = []
        for slot, start, c in chunks:  # over its own positions (to start + C, a whole block), not the capacity
            span = min(cap, -(-(start + c) // KEY_BLOCK) * KEY_BLOCK)
            allowed = np.arange(span)[None, :] <= (start + np.arange(c))[:, None]  # [C, span]
            chunk_masks.append((slot, c, self.mask(allowed, (cfg.num_kv_heads, cfg.group_size, c, span))))
        return AttentionPlan(cfg, cache, b, groups, order, *views, *blocks, chunk_masks)

    def decode_groups(self, cache: SlotKVCache, positions: np.ndarray) -> tuple[list[RowGroup], paddle.Tensor | None]:
        """Split the B decode rows into at most two groups: the shortest k over their longest length rounded up to
        KEY_BLOCK (keys gathered into a compact copy), and the rest over the whole capacity. Why: the capacity is
        a bucket above the longest row, so one long row makes every short one attend (and read K/V) over it.
        Returns the groups and `order` [B] (each row's place in the groups' concatenated output; None: in order).
        """
        kv, g = self.cfg.num_kv_heads, self.cfg.group_size
        cap, b = cache.capacity, int(positions.shape[0])
        allowed = np.arange(cap)[None, :] <= positions[:, None]  # [B, cap]
        if not self.true_lengths or cap % KEY_BLOCK:
            return [RowGroup(None, None, self.mask(allowed[:, None, None, :], (b, kv, g, cap)))], None
        by_len = np.argsort(positions, kind="stable")  # [B] rows, shortest first
        spans = (positions[by_len] // KEY_BLOCK + 1) * KEY_BLOCK  # [B] each row's length rounded up to a block
        k = np.arange(1, b + 1)  # [B] split after the k shortest rows
        cost = self.GATHER_COST * (k * spans + (b - k) * cap) + self.GROUP_COST * (1 + (k < b))
        best = int(np.argmin(cost))
        if cost[best] >= b * cap:
            return [RowGroup(None, None, self.mask(allowed[:, None, None, :], (b, kv, g, cap)))], None
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
        mask = self.mask(allowed[:, None, None, :], (len(rows), kv, g, span))
        return RowGroup(paddle.to_tensor(rows.astype(np.int64)), paddle.to_tensor(blocks.reshape(-1)), mask)

    @staticmethod
    def mask(allowed: np.ndarray, shape: tuple[int, ...]) -> paddle.Tensor:
        """Additive float32 mask (0 where allowed) materialized at `shape`, the scores' own: Paddle's CPU add with
        broadcasting took 244 us for [32, 3, 3, 128] + [32, 1, 1, 128], a same-shape add 7 us."""
        return paddle.to_tensor(np.where(np.broadcast_to(allowed, shape), np.float32(0.0), np.float32(MASKED)))

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


@dataclass(frozen=True)
class AttentionPlan:
    """One step's attention, planned once (Attention.plan) and run in every layer (layer)."""

    cfg: ModelConfig
    cache: SlotKVCache
    b: int  # decode rows
    groups: list[RowGroup]
    order: paddle.Tensor | None  # [B] each row's place in the groups' output; None: in order
    k_views: list[paddle.Tensor]  # per layer [B, kv, cap, d], the decode rows' slots
    v_views: list[paddle.Tensor]
    k_blocks: list[paddle.Tensor]  # per layer [slots kv cap/KEY_BLOCK, KEY_BLOCK d]; empty: no group gathers
    v_blocks: list[paddle.Tensor]
    chunks: list[tuple[int, int, paddle.Tensor]]  # per prompt chunk (slot, C, mask [kv, g, C, span])

    def layer(self, i: int, q: paddle.Tensor) -> paddle.Tensor:
        """Layer i's attention of the step's queries q [N, nh, d] (pre-scaled; the B decode rows first): [N, nh d]."""
        cfg = self.cfg
        outs = []
        if self.b:
            qd = (q[:self.b] if self.chunks else q).reshape([self.b, cfg.num_kv_heads, cfg.group_size, cfg.head_dim])
            kb, vb = (self.k_blocks[i], self.v_blocks[i]) if self.k_blocks else (None, None)
            outs.append(self._decode(qd, self.k_views[i], self.v_views[i], kb, vb))
        r = self.b
        for slot, c, mask in self.chunks:
            outs.append(self._chunk(i, slot, q[r:r + c], mask))
            r += c
        return outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)

    def _decode(
        self, q: paddle.Tensor, k_view: paddle.Tensor, v_view: paddle.Tensor, k_blocks: paddle.Tensor | None,
        v_blocks: paddle.Tensor | None,
    ) -> paddle.Tensor:
        """Attention of the decode rows' queries q [B, kv, g, d] (grouped under their kv head), one layer: [B, nh d].
        k_view, v_view: [B, kv, cap, d] the slots' caches; k_blocks, v_blocks: the same layer cut into blocks, for
        the groups that gather."""
        kv, d = self.cfg.num_kv_heads, self.cfg.head_dim
        width = self.cfg.num_heads * d
        outs = []
        for gr in self.groups:
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
            outs.append(paddle.matmul(F.softmax(scores, axis=-1), v).reshape([-1, width]))
        out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)  # [B, nh d], in the groups' order
        return out if self.order is None else paddle.gather(out, self.order)

    def _chunk(self, i: int, slot: int, q: paddle.Tensor, mask: paddle.Tensor) -> paddle.Tensor:
        """Attention of a chunk's C queries [C, nh, d] (pre-scaled) over its slot's cache: [C, nh d]."""
        cfg = self.cfg
        c, span = int(q.shape[0]), int(mask.shape[-1])
        kv, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        k_cache, v_cache = self.cache.layer(i)  # [slots, kv, cap, d]
        # Only the positions written so far: a 126-token turn at position 1,344 attends over 1,472 keys, not the
        # 2,048 of the capacity (half the attention time of a chat's later turns, bench/PROFILE.md).
        k, v = k_cache[slot, :, :span], v_cache[slot, :, :span]  # [kv, span, d]
        qg = q.transpose([1, 0, 2]).reshape([kv, g * c, d])  # [kv, g C, d]; no repeat_kv copy
        scores = paddle.matmul(qg, k, transpose_y=True).reshape([kv, g, c, span]) + mask
        probs = F.softmax(scores, axis=-1).reshape([kv, g * c, span])
        out = paddle.matmul(probs, v)  # [kv, g C, d]
        return out.reshape([cfg.num_heads, c, d]).transpose([1, 0, 2]).reshape([c, cfg.num_heads * d])
