"""The prompt budget of a step while streams decode (--prefill-stall-steps), on the real engine in-process.

The scheduler bounds the prompt tokens a step carries by two measured averages: a decode step's time, and what a
prompt token adds to a step. Here the engine's step timer reads a clock the test drives: each forward advances it by
DECODE_S when it decodes rows and by PROMPT_TOKEN_S per prompt token it carries. The averages are then exact, and the
chunking is what the setting makes it, whatever the machine's speed. The forwards themselves are real.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from service.engine import scheduler
from service.engine.api import EngineConfig
from service.engine.checkpoints.loader import LoadedModel
from service.engine.decoder import LlamaDecoder
from service.engine.scheduler import Engine
from service.engine.types import GenerationRequest
from tests.support.engines import Collector
from tests.support.hooks import StepGate

DECODE_S = 0.125  # binary fractions, so that the averages stay exact: a decode step is worth 128 prompt tokens
PROMPT_TOKEN_S = 1 / 1024
LONG_PROMPT = 500  # tokens; max_prefill_tokens (512) would take it in one step


class StepClock:
    """The scheduler's `time` module, except perf_counter (its step timer), which only forwards advance."""

    def __init__(self) -> None:
        self.now = 0.0
        self.steps: list[tuple[int, list[int]]] = []  # per forward: decode rows, prompt chunk sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def perf_counter(self) -> float:
        return self.now

    def time(self, decoder: LlamaDecoder) -> None:
        forward = decoder.step

        def timed(cache: Any, tokens: np.ndarray, positions: np.ndarray, chunks: Any = ()) -> Any:
            out = forward(cache, tokens, positions, chunks)
            sizes = [len(c.tokens) for c in chunks]
            self.steps.append((len(tokens), sizes))
            self.now += DECODE_S * (len(tokens) > 0) + PROMPT_TOKEN_S * sum(sizes)
            return out

        decoder.step = timed  # type: ignore[method-assign]


def prompt(first: int, n: int) -> list[int]:
    return list(range(first, first + n))


def schedule(model: LoadedModel, stall_steps: float, monkeypatch: pytest.MonkeyPatch) -> tuple[list, list]:
    """The forwards of a long prompt that arrives while one stream decodes, and of one that arrives alone."""
    clock = StepClock()
    monkeypatch.setattr(scheduler, "time", clock)
    gate = StepGate(gated=True)
    config = EngineConfig(max_slots=4, max_prefill_tokens=512, max_context=1024, prefill_stall_steps=stall_steps,
                          prefix_cache_mb=0)
    engine = Engine(model, config, hooks=gate)
    clock.time(engine.decoder)
    engine.start(warmup=False)
    try:
        running = Collector()
        engine.submit(GenerationRequest(prompt(1000, 4), 40), running)
        assert engine.wait_until(lambda s: s.active == 1, 30)
        gate.permit(1)  # one decode step measured: DECODE_S
        assert engine.wait_until(lambda s: s.steps == 1, 30)
        gate.freeze()  # the long prompt is taken in only after the engine is decoding again
        assert gate.frozen.wait(30)
        mark = len(clock.steps)
        beside = Collector()
        engine.submit(GenerationRequest(prompt(2000, LONG_PROMPT), 2), beside)
        gate.open()
        gate.thaw()
        assert beside.done.wait(60) and running.done.wait(60)
        decoding = clock.steps[mark:]
        mark = len(clock.steps)
        alone = Collector()
        engine.submit(GenerationRequest(prompt(3000, LONG_PROMPT), 2), alone)
        assert alone.done.wait(60)
        return decoding, clock.steps[mark:]
    finally:
        engine.stop()


def chunks(steps: list[tuple[int, list[int]]]) -> list[tuple[int, int]]:
    """(decode rows, prompt tokens) of each forward that carried a prompt chunk."""
    return [(rows, n) for rows, sizes in steps for n in sizes]


def split(tokens: int, most: int) -> list[int]:
    return [most] * (tokens // most) + ([tokens % most] if tokens % most else [])


def test_prefill_stall_steps_bounds_the_prompt_chunk_beside_decoding_streams(
        loaded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a stream decodes, a 500-token prompt goes in chunks whose extra time is at most prefill_stall_steps
    decode steps: 1.5 steps are 192 prompt tokens, 0.5 steps 64; the stream decodes in every one of those steps.
    With nothing decoding, the same prompt goes in one step (max_prefill_tokens is 512)."""
    per_step = round(DECODE_S / PROMPT_TOKEN_S)  # 128
    for stall_steps, most in ((1.5, 192), (0.5, 64)):
        decoding, alone = schedule(loaded_model, stall_steps, monkeypatch)
        assert most == stall_steps * per_step
        assert chunks(decoding) == [(1, n) for n in split(LONG_PROMPT, most)], stall_steps
        assert chunks(alone) == [(0, LONG_PROMPT)], stall_steps
