"""Slot KV cache: per layer [slots, kv_heads, cap, head_dim], active slots packed in 0..B-1.

All layers live in one tensor per K and V, [layers, slots, kv_heads, cap, head_dim]; each layer's cache is a
view of it, so moving a slot or growing the cache is one copy for all layers.

Both `cap` and the number of allocated slots grow in buckets: a reallocation costs its size (zeroing fresh pages:
~0.1 s per 190 MB on this host, under load), and a bucket of slots just above those in use keeps it in
proportion to the streams running, not to max_slots.

Attention runs over the cache's capacity with a mask (rows far shorter than the longest gather their own first
blocks instead: attention.py), so its cost follows `cap`. `cap` therefore grows in buckets (64,
128, ..., max_context) just above the longest sequence, and shrinks again when long sequences leave. Packing keeps
`cache[:B]` a contiguous view, so a decode step copies nothing but the new token's K/V (measured: slicing the time
axis instead made matmul copy the cache).
"""

from __future__ import annotations

import numpy as np
import paddle

from service.engine.checkpoints.model_config import DType


def slots_for(used: int, max_slots: int, min_bucket: int = 4) -> int:
    """Allocated slots for `used` ones: the smallest power of two from min_bucket that holds them, or max_slots."""
    return min(capacity_for(used, max_slots, min_bucket), max_slots)


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
        self.slots = 0  # allocated slots, <= max_slots
        self.generation = 0  # bumped whenever the storage is reallocated: views taken before are stale
        self._k_all = paddle.zeros([0], dtype=dtype)
        self._v_all = paddle.zeros([0], dtype=dtype)
        self._k: list[paddle.Tensor] = []
        self._v: list[paddle.Tensor] = []
        self._flat_k: list[paddle.Tensor] = []
        self._flat_v: list[paddle.Tensor] = []
        self._flat_all_k = self._flat_all_v = self._k_all
        self.resize(capacity_for(1, max_context), used_slots=0)

    @property
    def nbytes(self) -> int:
        itemsize = 2 if self.dtype in ("float16", "bfloat16") else 4
        return 2 * self.num_layers * self.slots * self.kv_heads * self.capacity * self.head_dim * itemsize

    def resize(self, capacity: int, used_slots: int, slots: int | None = None) -> None:
        """Reallocate at `capacity` and `slots` (default: a bucket above used_slots), keeping the contents of the
        slots that stay (up to the smaller capacity); `used_slots` only chooses the default."""
        slots = slots or slots_for(max(used_slots, 1), self.max_slots)
        if capacity == self.capacity and slots == self.slots:
            return
        if not self.capacity:
            k = paddle.zeros([self.num_layers, slots, self.kv_heads, capacity, self.head_dim], dtype=self.dtype)
            v = paddle.zeros_like(k)
        else:
            k, v = self._reshaped(self._k_all, slots, capacity), self._reshaped(self._v_all, slots, capacity)
        self._k_all, self._v_all = k, v
        # Indexing and reshape return views, so writes through them (setitem, scatter_) land in the cache itself.
        self._k = [k[i] for i in range(self.num_layers)]
        self._v = [v[i] for i in range(self.num_layers)]
        self._flat_k = [t.reshape([-1, self.head_dim]) for t in self._k]
        self._flat_v = [t.reshape([-1, self.head_dim]) for t in self._v]
        self._flat_all_k, self._flat_all_v = k.reshape([-1, self.head_dim]), v.reshape([-1, self.head_dim])
        self.capacity = capacity
        self.slots = slots
        self.generation += 1

    def _reshaped(self, t: paddle.Tensor, slots: int, capacity: int) -> paddle.Tensor:
        """A new storage holding t's first min(slots) slots and min(capacity) positions, zeros elsewhere. Growing
        is a concat with zeros: 2x faster than zeros + a strided copy for 32 slots x 30 layers (357 vs 712 ms)."""
        keep_s, keep_c = min(slots, self.slots), min(capacity, self.capacity)
        t = t[:, :keep_s, :, :keep_c]  # a view
        shape = [self.num_layers, slots, self.kv_heads, capacity, self.head_dim]
        if slots > keep_s:
            t = paddle.concat([t, paddle.zeros([*shape[:1], slots - keep_s, *shape[2:3], keep_c, shape[4]],
                                               dtype=self.dtype)], axis=1)
        if capacity > keep_c:
            t = paddle.concat([t, paddle.zeros([*shape[:3], capacity - keep_c, shape[4]], dtype=self.dtype)], axis=3)
        if slots == keep_s and capacity == keep_c:
            t = t.clone()  # a compact copy, so that the old storage is freed
        return t

    def ensure(self, longest: int, used_slots: int) -> None:
        """Grow to hold `longest` positions and `used_slots` slots; shrink when the longest sequence fits a bucket a
        quarter the size, or the slots in use a quarter of those allocated."""
        want = capacity_for(longest, self.max_context)
        slots = slots_for(max(used_slots, 1), self.max_slots)
        cap_ok = self.capacity >= want and want * 4 > self.capacity
        slots_ok = self.slots >= slots and slots * 4 > self.slots
        if not (cap_ok and slots_ok):
            cap = self.capacity if cap_ok else (want if want > self.capacity else want * 2)
            self.resize(cap, used_slots, self.slots if slots_ok else (slots if slots > self.slots else slots * 2))

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
        for flat in (self._flat_all_k, self._flat_all_v):
            flat.scatter_(self._rows_all(dst, 0, length), paddle.gather(flat, self._rows_all(src, 0, length)))

    def read_slot(self, slot: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """A host copy of slot `slot`'s positions start..end-1: K and V [layers, kv, end - start, d]."""
        if self._k_all.place.is_cpu_place():  # one copy (never the view itself) out of a NumPy view of the storage
            k, v = (np.from_dlpack(t)[:, slot, :, start:end].copy() for t in (self._k_all, self._v_all))
            return k, v
        shape = [self.num_layers, self.kv_heads, end - start, self.head_dim]
        rows = self._rows_all(slot, start, end)
        k, v = (paddle.gather(flat, rows).reshape(shape).numpy() for flat in (self._flat_all_k, self._flat_all_v))
        return k, v

    def write_slot(self, slot: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write host K and V [layers, kv, n, d] into slot `slot`'s positions start..start+n-1 (the cache must hold
        them): one in-place scatter each, reading the arrays where they are on the host."""
        rows = self._rows_all(slot, start, start + k.shape[2])
        for flat, a in ((self._flat_all_k, k), (self._flat_all_v, v)):
            src = paddle.from_dlpack(a.__dlpack__()) if flat.place.is_cpu_place() else paddle.to_tensor(a)
            flat.scatter_(rows, src.reshape([-1, self.head_dim]).astype(self.dtype))

    def _rows_all(self, slot: int, start: int, end: int) -> paddle.Tensor:
        """Rows of slot `slot`'s positions start..end-1 in the storage flattened to [layers slots kv cap, d], in the
        order of a [layers, kv, n, d] block. Copies go through these (gather, scatter_): Paddle's strided slice
        assignment took 250-690 ms for 1,344 positions of SmolLM2 (4 slots, capacity 2048, load 11) where these
        take 20-50 ms."""
        layers = np.arange(self.num_layers)[:, None]
        layer_head = (layers * self.slots + slot) * self.kv_heads + np.arange(self.kv_heads)  # [layers, kv]
        return paddle.to_tensor((layer_head[:, :, None] * self.capacity + np.arange(start, end)).reshape(-1))
