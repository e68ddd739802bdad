"""Prefix reuse across requests: K/V kept after a sequence ends, found again by a later prompt that starts the same.

A host-side store of full blocks of BLOCK positions, keyed by a hash chain: a block's key hashes its parent's key
and its own tokens, and the chain's root hashes the namespace (the caller, unless sharing is on, and the request's
cache_salt). So a block is found only by a prompt with the same namespace and the same tokens up to and including
that block. Each block holds its K and V for every layer, [layers, kv_heads, BLOCK, head_dim], copied out of a slot
when a sequence ends or is preempted and copied back into the slot of a new one, whose prefill then starts after it.

Memory is bounded by a budget in bytes. Eviction takes the least recently used block of the owner (the caller who
stored it) holding the most bytes, the one storing on a tie: one caller's cache evicts its own before anyone else's,
and a store never evicts a caller holding no more than the caller storing. So however much one caller floods, each
of n owners keeps what it holds up to budget / n. A lookup touches a chain leaf first and root last, so within an
owner the leaves of a chain go before their parents.

Copies go block by block between the host store and the slot (SlotKVCache.read_slot, write_slot): a keep copies
only the blocks not stored yet.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from service.engine.kv_cache import SlotKVCache

SCOPES = ("caller", "shared")  # whose prefixes a request may reuse: its own caller's, or anyone's


@dataclass
class _Block:
    owner: str
    parent: bytes
    tokens: bytes  # the block's token ids, checked on every lookup (a hash is not trusted alone)
    k: np.ndarray  # [layers, kv, BLOCK, d]
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class Hit:
    """What a lookup found: `positions` (a multiple of the block) whose K/V are in `keys`, in order."""

    positions: int
    keys: tuple[bytes, ...]


def _root(namespace: str) -> bytes:
    return hashlib.blake2b(b"tokenstream-prefix\0" + namespace.encode(), digest_size=16).digest()


def _child(parent: bytes, tokens: bytes) -> bytes:
    return hashlib.blake2b(parent + tokens, digest_size=16).digest()


class PrefixCache:
    """Engine thread only. budget_bytes 0 turns reuse off (lookups find nothing, nothing is stored)."""

    def __init__(self, budget_bytes: int, block: int, scope: str = "caller") -> None:
        if scope not in SCOPES:
            raise ValueError(f"prefix cache scope {scope!r} is not one of {SCOPES}")
        self.budget = budget_bytes
        self.block = block
        self.scope = scope
        self._blocks: dict[bytes, _Block] = {}
        self._lru: dict[str, OrderedDict[bytes, None]] = {}  # per owner, oldest first
        self._owner_bytes: dict[str, int] = {}
        self.nbytes = 0
        self.queries = 0  # lookups made
        self.hits = 0  # lookups that found at least one block
        self.reused_tokens = 0  # positions copied in instead of prefilled
        self.stored_tokens = 0  # positions copied out
        self.evicted_blocks = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def namespace(self, caller: str, salt: str) -> str:
        who = caller if self.scope == "caller" else ""
        return f"{len(who)}:{who}|{salt}"

    def _chain(self, namespace: str, tokens: np.ndarray, blocks: int) -> list[tuple[bytes, bytes, bytes]]:
        """(key, parent, block token bytes) for the first `blocks` full blocks of tokens."""
        out = []
        key = _root(namespace)
        ids = np.ascontiguousarray(tokens, dtype=np.int64)
        for i in range(blocks):
            raw = ids[i * self.block : (i + 1) * self.block].tobytes()
            parent, key = key, _child(key, raw)
            out.append((key, parent, raw))
        return out

    def lookup(self, namespace: str, tokens: np.ndarray, limit: int) -> Hit:
        """The longest stored prefix of tokens, of at most `limit` positions (a caller leaves at least one token to
        prefill, so that its step computes logits)."""
        if not self.enabled:
            return Hit(0, ())
        self.queries += 1
        found: list[bytes] = []
        for key, parent, raw in self._chain(namespace, tokens, max(limit, 0) // self.block):
            entry = self._blocks.get(key)
            if entry is None or entry.parent != parent or entry.tokens != raw:
                break
            found.append(key)
        self._touch(found)
        if found:
            self.hits += 1
            self.reused_tokens += len(found) * self.block
        return Hit(len(found) * self.block, tuple(found))

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the root ends most recent: leaves are evicted before their parents
            self._lru[self._blocks[key].owner].move_to_end(key)

    def restore(self, cache: SlotKVCache, slot: int, hit: Hit) -> None:
        """Copy the hit's blocks into positions 0.. of `slot` (the cache must already hold hit.positions)."""
        for i, key in enumerate(hit.keys):
            entry = self._blocks[key]
            cache.write_slot(slot, i * self.block, entry.k, entry.v)

    def store(self, cache: SlotKVCache, slot: int, namespace: str, owner: str, tokens: np.ndarray) -> int:
        """Keep the full blocks of `tokens` (the slot's positions 0..len-1) not stored yet; returns positions copied."""
        if not self.enabled or slot < 0:
            return 0
        chain = self._chain(namespace, tokens, len(tokens) // self.block)
        first = 0
        while first < len(chain) and chain[first][0] in self._blocks:
            first += 1
        self._touch([key for key, _, _ in chain[:first]])
        new = chain[first:]
        itemsize = 2 if cache.dtype in ("float16", "bfloat16") else 4
        per_block = 2 * cache.num_layers * cache.kv_heads * self.block * cache.head_dim * itemsize
        new = new[: max(0, self.budget // per_block)]  # never more than the whole budget
        if not new:
            return 0
        start, end = first * self.block, (first + len(new)) * self.block
        lru = self._lru.setdefault(owner, OrderedDict())
        for i, (key, parent, raw) in enumerate(new):
            at = start + i * self.block
            entry = _Block(owner, parent, raw, *cache.read_slot(slot, at, at + self.block))  # a copy per block
            self._blocks[key] = entry
            lru[key] = None
            self.nbytes += entry.nbytes
            self._owner_bytes[owner] = self._owner_bytes.get(owner, 0) + entry.nbytes
        self._touch([key for key, _, _ in chain[: first + len(new)]])
        self.stored_tokens += end - start
        self._evict(owner, keep={key for key, _, _ in new})
        return end - start

    def _evict(self, storing: str, keep: set[bytes]) -> None:
        while self.nbytes > self.budget and self._blocks:
            owner = max(self._owner_bytes, key=lambda o: (self._owner_bytes[o], o == storing))
            lru = self._lru[owner]
            key = next((k for k in lru if k not in keep), None) if len(keep) else next(iter(lru))
            if key is None:
                key = next(iter(lru))
            del lru[key]
            entry = self._blocks.pop(key)
            self.nbytes -= entry.nbytes
            self._owner_bytes[owner] -= entry.nbytes
            if not lru:
                del self._lru[owner], self._owner_bytes[owner]
            self.evicted_blocks += 1

    def owner_bytes(self) -> dict[str, int]:
        return dict(self._owner_bytes)
