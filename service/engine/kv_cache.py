"""Slot KV cache: per layer [max_slots, kv_heads, cap, head_dim], active slots packed in 0..B-1.

All layers live in one tensor per K and V, [layers, max_slots, kv_heads, cap, head_dim]; each layer's cache is a
view of it, so moving a slot or growing the cache is one copy for all layers.

Attention runs over the cache's whole capacity with a mask, so its cost follows `cap`, not the true lengths.
`cap` therefore grows in buckets (64, 128, ..., max_context) just above the longest sequence, and shrinks
again when long sequences leave. Packing keeps `cache[:B]` a contiguous view, so a decode step copies
nothing but the new token's K/V (measured: slicing the time axis instead made matmul copy the cache).
"""

from __future__ import annotations

import numpy as np
import paddle

from service.engine.model_config import DType


def capacity_for(length: int, max_context: int, min_bucket: int = 64) -> int:
    """The smallest bucket (a power of two, or max_context itself) that holds `length` positions."""
    cap = min_bucket
    while cap < length:
        cap *= 2
    return min(cap, max_context)


class SlotKVCache:
    def __init__(
        self, num_layers: int, max_slots: int, kv_heads: int, head_dim: int, max_context: int, dtype: DType
    ) -> None:
        self.num_layers = num_layers
        self.max_slots = max_slots
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.max_context = max_context
        self.dtype = dtype
        self.capacity = 0
        self.generation = 0  # bumped whenever the storage is reallocated: views taken before are stale
        self._k_all = paddle.zeros([0], dtype=dtype)
        self._v_all = paddle.zeros([0], dtype=dtype)
        self._k: list[paddle.Tensor] = []
        self._v: list[paddle.Tensor] = []
        self._flat_k: list[paddle.Tensor] = []
        self._flat_v: list[paddle.Tensor] = []
        self.resize(capacity_for(1, max_context), used_slots=0)

    @property
    def nbytes(self) -> int:
        itemsize = 2 if self.dtype in ("float16", "bfloat16") else 4
        return 2 * self.num_layers * self.max_slots * self.kv_heads * self.capacity * self.head_dim * itemsize

    def resize(self, capacity: int, used_slots: int) -> None:
        """Reallocate at `capacity`, keeping the first `used_slots` slots' contents (up to the smaller capacity)."""
        if capacity == self.capacity:
            return
        keep = min(capacity, self.capacity)
        shape = [self.num_layers, self.max_slots, self.kv_heads, capacity, self.head_dim]
        k = paddle.zeros(shape, dtype=self.dtype)
        v = paddle.zeros(shape, dtype=self.dtype)
        if used_slots and keep:
            k[:, :used_slots, :, :keep] = self._k_all[:, :used_slots, :, :keep]
            v[:, :used_slots, :, :keep] = self._v_all[:, :used_slots, :, :keep]
        self._k_all, self._v_all = k, v
        # Indexing and reshape return views, so writes through them (setitem, scatter_) land in the cache itself.
        self._k = [k[i] for i in range(self.num_layers)]
        self._v = [v[i] for i in range(self.num_layers)]
        self._flat_k = [t.reshape([-1, self.head_dim]) for t in self._k]
        self._flat_v = [t.reshape([-1, self.head_dim]) for t in self._v]
        self.capacity = capacity
        self.generation += 1

    def ensure(self, longest: int, used_slots: int) -> None:
        """Grow to hold `longest` positions; shrink when the longest sequence fits a bucket a quarter the size."""
        want = capacity_for(longest, self.max_context)
        if want > self.capacity or want * 4 <= self.capacity:
            self.resize(want if want > self.capacity else want * 2, used_slots)

    def layer(self, i: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        return self._k[i], self._v[i]

    def active(self, i: int, b: int) -> tuple[paddle.Tensor, paddle.Tensor]:
        return self._k[i][:b], self._v[i][:b]  # views: slicing the slot axis is contiguous

    def flat_rows(self, positions: np.ndarray) -> paddle.Tensor:
        """Row index of (slot, head, position) for slots 0..B-1 in the flattened cache: [B kv] int64."""
        return paddle.to_tensor(self.flat_rows_np(positions))

    def write_rows(self, i: int, rows: paddle.Tensor, k: paddle.Tensor, v: paddle.Tensor) -> None:
        self._flat_k[i].scatter_(rows, k)  # in place: 0.006 ms whatever B, where out-of-place copies the cache
        self._flat_v[i].scatter_(rows, v)

    def flat_rows_np(self, positions: np.ndarray) -> np.ndarray:
        return self.rows_np(np.arange(positions.shape[0]), positions)

    def rows_np(self, slots: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Row of (slot, head, position) in a layer's flattened cache for N (slot, position) pairs: [N kv], in the
        order of an [N, kv, d] block of new K/V rows."""
        heads = np.arange(self.kv_heads, dtype=np.int64)
        slot_head = slots.astype(np.int64)[:, None] * self.kv_heads + heads[None, :]
        return (slot_head * self.capacity + positions.astype(np.int64)[:, None]).reshape(-1)

    def rows(self, slots: np.ndarray, positions: np.ndarray) -> paddle.Tensor:
        return paddle.to_tensor(self.rows_np(slots, positions))

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (to keep active slots packed)."""
        if src == dst or length <= 0:
            return
        self._k_all[:, dst, :, :length] = self._k_all[:, src, :, :length]
        self._v_all[:, dst, :, :length] = self._v_all[:, src, :, :length]
