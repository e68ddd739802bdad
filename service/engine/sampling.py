"""Per-row token choice: greedy, or temperature/top-k/top-p sampling with a per-request seeded generator.

Each sampled row draws exactly one uniform number per step from its own generator and picks by inverse CDF over
its candidates in id order, so a seeded request's tokens do not depend on what else is in the batch. Id order, not
probability order: another batch changes the logits in their last bits (MKL blocks the matmuls by batch size), which
reorders near-equal candidates; walked in id order, such a change moves a token only when the draw falls within
rounding of a CDF boundary or the top-p cut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from service.engine.constraints import apply_mask
from service.engine.sequence import SequenceState
from service.engine.types import SamplingOptions, TopToken

Choice = tuple[int, float | None, tuple[TopToken, ...]]  # (token, its logprob if asked, the top alternatives if asked)

_NUCLEUS_FIRST_TRY = 256  # candidates examined before falling back to sorting the whole vocabulary


def apply_penalties(logits: np.ndarray, seen: np.ndarray | None, penalty: float, banned: tuple[int, ...]) -> None:
    """In place on one row [V]: repetition penalty on `seen` ids (CTRL / HF style) and banned ids to -inf."""
    if seen is not None and seen.size and penalty != 1.0:
        picked = logits[seen]
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    if banned:
        logits[list(banned)] = -np.inf


def _sorted(z: np.ndarray, pool: np.ndarray) -> np.ndarray:
    return pool[np.lexsort((pool, -z[pool]))]  # most likely first, ties by id: a fixed order


def _candidates(z: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Candidate ids in id order (see the module's docstring) and their unnormalised probabilities after top-k, then
    top-p (as HF warpers apply them)."""
    v = z.shape[0]
    z = z - z.max()
    if 0 < top_k < v:
        pool = np.argpartition(-z, top_k - 1)[:top_k]
    elif top_p >= 1.0:
        return np.arange(v), np.exp(z)  # plain sampling
    else:
        pool = np.arange(v)
    if top_p >= 1.0:
        ids = np.sort(pool)
        return ids, np.exp(z[ids])
    # The nucleus (most likely first, ties by id) is usually small: look at the most likely few first, and sort
    # everything only if needed.
    total = np.exp(z[pool]).sum()
    if pool.size > _NUCLEUS_FIRST_TRY:
        few = _sorted(z, pool[np.argpartition(-z[pool], _NUCLEUS_FIRST_TRY - 1)[:_NUCLEUS_FIRST_TRY]])
        cum = np.cumsum(np.exp(z[few])) / total
        if cum[-1] >= top_p:
            return _by_id(z, few[: int(np.searchsorted(cum, top_p, side="left")) + 1])
    ids = _sorted(z, pool)
    cum = np.cumsum(np.exp(z[ids])) / total
    return _by_id(z, ids[: min(int(np.searchsorted(cum, top_p, side="left")) + 1, ids.size)])


def _by_id(z: np.ndarray, nucleus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.sort(nucleus)
    return ids, np.exp(z[ids])


def sample_row(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator) -> int:
    """Choose the next token from one row of processed logits [V] (float64)."""
    if opts.greedy:
        return int(np.argmax(logits))
    z = logits / opts.temperature
    ids, probs = _candidates(z, opts.top_k, opts.top_p)
    cdf = np.cumsum(probs)
    u = rng.random() * cdf[-1]
    return int(ids[min(int(np.searchsorted(cdf, u, side="right")), len(ids) - 1)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max()
    return z - np.log(np.exp(z).sum())


def top_alternatives(logprobs: np.ndarray, n: int, decode: Callable[[list[int]], str]) -> tuple[TopToken, ...]:
    if n <= 0:
        return ()
    part = np.argpartition(-logprobs, n - 1)[:n]
    order = np.lexsort((part, -logprobs[part]))
    return tuple(TopToken(int(i), decode([int(i)]), float(logprobs[i])) for i in part[order])


def batch_argmax(rows: Sequence[SequenceState], logits: np.ndarray) -> list[int | None]:
    """Each row's argmax where the row takes it (it needs no logits), else None; one argmax over logits [B, V]."""
    if all(s.needs_logits for s in rows):
        return [None] * len(rows)
    greedy = logits.argmax(axis=-1)  # [B]
    return [None if s.needs_logits else int(t) for s, t in zip(rows, greedy, strict=True)]


def choose(seq: SequenceState, raw: np.ndarray, argmax: int | None, decode: Callable[[list[int]], str],
           mask: np.ndarray | None = None) -> Choice:
    """A row's next token from its logits [V] with the request's own parameters, and the logprobs it asked for.
    `argmax`: the row's from batch_argmax, taken as it is (a row that needs no logits). `mask`: a constrained row's
    allowed tokens (a bitmask, constraints.py), applied before the choice; logprobs stay the model's own."""
    if argmax is not None:
        return argmax, None, ()
    req = seq.req
    row = raw.astype(np.float64)
    seen = None
    if req.sampling.repetition_penalty != 1.0:
        seen = np.unique(np.concatenate([seq.prompt, np.asarray(seq.generated, dtype=np.int64)]))
    apply_penalties(row, seen, req.sampling.repetition_penalty, seq.banned)
    if mask is not None:
        apply_mask(row, mask)
        if not np.isfinite(row).any():
            raise RuntimeError("the constraint allows no token here")
    token = sample_row(row, req.sampling, seq.rng)  # type: ignore[arg-type]
    if not (req.logprobs or req.top_n):
        return token, None, ()
    lp = log_softmax(raw.astype(np.float64))
    return token, float(lp[token]) if req.logprobs else None, top_alternatives(lp, req.top_n, decode)
