"""Prototype of the scheduler change recommended in bench/PROFILE.md, measured by `bench.profile_step --parts
arrivals`. Not used by the server: the lead owns the scheduler (service/engine/engine.py); this subclass only shows
the change and its effect.

What changes against Engine:
  1. Prompts are prefilled together: every waiting prompt that fits the iteration's token budget gets its own slot
     (len(active), len(active) + 1, ...) and all of them run as chunks of one LlamaDecoder.step.
  2. That step is the decode step: the decode rows and the prompt chunks share every weight read. A prompt's first
     token comes out of the same step as everybody else's next token.
  3. The token budget follows a time budget: prompt tokens per iteration = stall_factor x (decode step time) /
     (measured extra seconds per prompt token in a mixed step), between min_chunk and max_prefill_tokens. With no
     decode rows running there is nothing to stall and the whole max_prefill_tokens is used.
Slots stay packed: only the last planned prompt may be left unfinished (it becomes `_prefilling`, at slot
len(active) once the finished ones have joined), and a new prompt is only started after an unfinished one ends.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from service.engine.checkpoints.loader import LoadedModel
from service.engine.decoder import PrefillChunk
from service.engine.engine import Engine, EngineConfig, _ema, _Sequence


class MixedEngine(Engine):
    def __init__(self, model: LoadedModel, config: EngineConfig, stall_factor: float = 1.0,
                 min_chunk: int = 16) -> None:
        super().__init__(model, config)
        self.stall_factor = stall_factor
        self.min_chunk = min_chunk
        self._plan: list[tuple[_Sequence, int, bool]] = []  # (sequence, prompt tokens this step, completes)
        self._extra_s_per_token = 0.0  # a mixed step's time beyond a plain decode step, per prompt token

    def _budget(self) -> int:
        cap = self.config.max_prefill_tokens
        # Before the first mixed step, a prompt token alone (prefill without decode rows) is the estimate.
        per_token = self._extra_s_per_token or self._prefill_s_per_token
        if not self._active or self._step_s == 0.0 or per_token == 0.0:
            return cap
        tokens = int(self.stall_factor * self._step_s / per_token)
        return max(self.min_chunk, min(cap, tokens))

    def _prefill(self) -> None:
        """Plan this iteration's prompt chunks; they run inside the decode step (or alone with no decode rows)."""
        budget = self._budget()
        plan: list[tuple[_Sequence, int, bool]] = []
        if self._prefilling is not None:  # an unfinished prompt goes on first, from its slot len(active)
            seq = self._prefilling
            n = min(budget, len(seq.prompt) - seq.prefilled)
            plan.append((seq, n, seq.prefilled + n == len(seq.prompt)))
            budget -= n
        while budget > 0 and self._waiting and (not plan or plan[-1][2]) \
                and len(self._active) + len(plan) < self.config.max_slots:
            seq = self._waiting.popleft()
            seq.slot = len(self._active) + len(plan)
            seq.prefill_start_ns = time.time_ns()
            n = min(budget, len(seq.prompt))
            plan.append((seq, n, n == len(seq.prompt)))
            budget -= n
        self._plan = plan
        self._prefilling = plan[-1][0] if plan and not plan[-1][2] else self._prefilling
        if plan and not self._active:
            self._step_with_chunks()

    def _decode(self) -> None:
        self._step_with_chunks()

    def _step_with_chunks(self) -> None:
        plan, self._plan = self._plan, []
        rows = list(self._active)
        tokens = np.fromiter((s.last_token for s in rows), dtype=np.int64, count=len(rows))
        positions = np.fromiter((s.cache_len for s in rows), dtype=np.int64, count=len(rows))
        longest = max([s.cache_len + 1 for s in rows] + [seq.prefilled + n for seq, n, _ in plan] + [1])
        self.cache.ensure(min(longest, self.config.max_context), len(rows) + len(plan))
        chunks = [PrefillChunk(seq.slot, seq.prompt[seq.prefilled:seq.prefilled + n], seq.prefilled, done)
                  for seq, n, done in plan]
        started = time.perf_counter()
        logits, chunk_logits = self.decoder.step(self.cache, tokens, positions, chunks)
        spent = time.perf_counter() - started
        n_prompt = sum(n for _, n, _ in plan)
        if rows and not plan:
            self._step_s = _ema(self._step_s, spent)
        elif rows and n_prompt:
            self._extra_s_per_token = _ema(self._extra_s_per_token, max(spent - self._step_s, 0.0) / n_prompt)
        if n_prompt:
            self._prefill_s_per_token = _ema(self._prefill_s_per_token, spent / n_prompt)
        finished: list[tuple[_Sequence, Any]] = []
        for (seq, n, done), out in zip(plan, chunk_logits, strict=True):
            seq.prefilled += n
            if done:
                if seq is self._prefilling:
                    self._prefilling = None
                self._active.append(seq)  # in slot order: len(active) == seq.slot
                finished.append((seq, out))
        if rows:
            assert logits is not None
            self._sample_rows(rows, logits)
        if finished:
            self._sample_rows([s for s, _ in finished], np.stack([o for _, o in finished]))
        self._release_done()
