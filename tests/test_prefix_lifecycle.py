"""Prefix reuse across a stream's life (service/engine/prefix_cache.py, scheduler.py): a preempted stream resumes from
its kept K/V, one caller's flood does not evict another's kept prefix, and nothing is kept once the engine drains.

Decode steps happen only when the test allows them (StepGate), so every schedule here is the same on any machine.
"""

from __future__ import annotations

import pytest

from service.engine.api import KV_BLOCK, EngineConfig
from service.engine.checkpoints.loader import LoadedModel, load_model
from service.engine.scheduler import Engine
from service.engine.types import Finish, GenerationRequest, SamplingOptions
from tests.gguf_files import smollm2_file
from tests.support.engines import Collector, make_engine, run_many
from tests.support.hooks import StepGate

SEEDED = SamplingOptions(temperature=0.8, top_k=40, seed=4321)


def gated_engine(model: LoadedModel, **overrides: object) -> tuple[Engine, StepGate]:
    """A started engine (prefix cache on) whose decode steps wait for the test's permits."""
    gate = StepGate(gated=True)
    values: dict = {"max_slots": 4, "max_prefill_tokens": 256, "max_context": 512, **overrides}
    engine = Engine(model, EngineConfig(**values), hooks=gate)
    engine.start(warmup=False)
    return engine, gate


def block_bytes(model: LoadedModel) -> int:
    """What one kept block of float32 K and V takes."""
    cfg = model.config
    return 2 * cfg.num_layers * cfg.num_kv_heads * KV_BLOCK * cfg.head_dim * 4


def ids(start: int, n: int) -> list[int]:
    """n distinct token ids from `start`: prompts that share no block unless they share a start."""
    return list(range(start, start + n))


# -- preemption -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(smollm2_file())


@pytest.mark.parametrize("sampling", [SamplingOptions(), SEEDED], ids=["greedy", "seeded"])
def test_a_preempted_stream_resumes_from_its_kept_kv_with_the_same_tokens(smollm2: LoadedModel,
                                                                         sampling: SamplingOptions) -> None:
    """SmolLM2, 2 slots: caller a's two streams decode 40 steps; caller b arrives, so a's shorter stream is
    preempted (its K/V kept) and b takes its slot. When a slot frees, the preempted stream's restart restores the
    kept blocks (one hit, exactly the full blocks of its context but the last token) and prefills only the rest;
    its tokens are those of the same request run alone, unpreempted, on an engine with reuse off."""
    enc = smollm2.tokenizer.encode
    story = ("Write a short story about a lighthouse keeper, his old dog and a storm at sea. The keeper has lived "
             "alone on the rock for thirty years, and tonight a ship is in trouble near the reef. Tell it in a calm "
             "voice.")
    victim = GenerationRequest(enc(story), 48, sampling=sampling, min_new_tokens=48, caller="a")
    other = GenerationRequest(enc("List the planets of the solar system with one fact about each. " * 6), 48,
                              sampling=sampling, min_new_tokens=48, caller="a")
    newcomer = GenerationRequest(enc("Say hello."), 4, caller="b")
    assert len(victim.prompt_ids) < len(other.prompt_ids)  # the victim is a's cheapest stream to recompute

    reference = make_engine(smollm2, prefix_cache_mb=0, max_slots=2)
    try:
        (alone,) = run_many(reference, [victim])
    finally:
        reference.stop()

    engine, gate = gated_engine(smollm2, max_slots=2)
    try:
        cols = {"victim": Collector(), "other": Collector(), "newcomer": Collector()}
        engine.submit(victim, cols["victim"])
        engine.submit(other, cols["other"])
        assert engine.wait_until(lambda s: s.active == 2, 60)  # both prefilled: one token each
        steps = 40
        gate.permit(steps)
        assert engine.wait_until(lambda s: s.steps == steps, 300)
        engine.submit(newcomer, cols["newcomer"])
        assert engine.wait_until(lambda s: s.preemptions == 1 and s.active == 2 and s.waiting == 1, 60)
        gate.freeze()  # held at the next iteration's start: the preemption's iteration is over
        assert gate.frozen.wait(60)
        cache_len = len(victim.prompt_ids) + steps  # its first token and `steps` more; the newest is not written
        kept = engine.stats()
        assert kept.prefix_cache_bytes == cache_len // KV_BLOCK * block_bytes(smollm2)  # only the victim's blocks
        gate.thaw()
        gate.open()
        for col in cols.values():
            assert col.done.wait(300)
        after = engine.stats()
    finally:
        gate.thaw()
        engine.stop()
    assert cols["victim"].final.finish is Finish.MAX_TOKENS
    assert cols["victim"].ids == alone.ids
    # The restart found its kept blocks: all but a last partial block, and never its last position (the step that
    # continues it writes that one).
    assert after.prefix_hits - kept.prefix_hits == 1
    assert after.prefix_reused_tokens - kept.prefix_reused_tokens == (cache_len - 1) // KV_BLOCK * KV_BLOCK > 0
    assert cols["victim"].final.cached_prompt_tokens == 0  # usage reports the first start's reuse: none


# -- fairness of memory ---------------------------------------------------------------------------------------


def test_one_callers_flood_does_not_evict_another_callers_kept_prefix(loaded_model: LoadedModel) -> None:
    """A 1 MiB budget (64 blocks of this model). Caller quiet keeps a 3-block prefix; caller flood then ends 8
    prompts of 15 blocks each, twice the budget. Eviction takes the biggest holder's least recently used blocks,
    so flood evicts its own oldest: quiet's prefix is still all there, flood's first prompt is gone, its last
    kept, and the cache holds no more than the budget."""
    engine = make_engine(loaded_model, prefix_cache_mb=1)
    block = block_bytes(loaded_model)
    assert engine.prefix.budget // block == 64
    try:
        quiet = ids(1000, 3 * KV_BLOCK + 5)
        run_many(engine, [GenerationRequest(quiet, 1, caller="quiet")])
        floods = [ids(5000 + 1000 * i, 15 * KV_BLOCK + 3) for i in range(8)]
        for prompt in floods:
            run_many(engine, [GenerationRequest(prompt, 1, caller="flood")])
        held = engine.prefix.owner_bytes()
        assert held.get("quiet", 0) == 3 * block
        assert engine.stats().prefix_cache_bytes == sum(held.values()) <= engine.prefix.budget
        assert engine.prefix.evicted_blocks >= 8 * 15 + 3 - 64

        def cached(prompt: list[int], caller: str) -> int:
            (col,) = run_many(engine, [GenerationRequest(prompt, 1, caller=caller)])
            return col.final.cached_prompt_tokens

        assert cached(quiet, "quiet") == 3 * KV_BLOCK
        assert cached(floods[-1], "flood") == 15 * KV_BLOCK
        assert cached(floods[0], "flood") == 0
    finally:
        engine.stop()


# -- drain ----------------------------------------------------------------------------------------------------


def test_streams_cancelled_at_drain_keep_nothing(loaded_model: LoadedModel) -> None:
    """At drain the server cancels every stream left (Engine.cancel_all): they end CANCELLED at once and none of
    their K/V is copied into the prefix cache, although the same streams ending normally are kept."""
    engine, gate = gated_engine(loaded_model)
    try:
        gate.open()
        run_many(engine, [GenerationRequest(ids(100, 4 * KV_BLOCK), 2, caller="d")])
        assert engine.stats().prefix_cache_bytes == 4 * block_bytes(loaded_model)  # a normal end keeps its blocks
        gate.close()
        cols = [Collector() for _ in range(3)]
        for i, col in enumerate(cols):
            engine.submit(GenerationRequest(ids(2000 + 1000 * i, 5 * KV_BLOCK), 50, caller="d"), col)
        assert engine.wait_until(lambda s: s.active == 3, 60)
        gate.permit(3)
        assert engine.wait_until(lambda s: s.steps >= 4, 60)
        before = engine.stats()
        stored = engine.prefix.stored_tokens
        engine.cancel_all()
        for col in cols:
            assert col.done.wait(60)
        assert engine.wait_until(lambda s: s.active == 0, 60)
        assert [c.final.finish for c in cols] == [Finish.CANCELLED] * 3
        assert engine.prefix.stored_tokens == stored
        assert engine.stats().prefix_cache_bytes == before.prefix_cache_bytes
    finally:
        engine.stop()
    assert not engine.alive


def test_a_stream_ending_while_the_engine_stops_keeps_nothing(loaded_model: LoadedModel) -> None:
    """A stream waits for its last decode step; the engine is held at the start of an iteration and stop() is
    called. The held iteration still takes that step, the stream ends normally, and the engine ends without
    copying its K/V."""
    engine, gate = gated_engine(loaded_model)
    col = Collector()
    try:
        engine.submit(GenerationRequest(ids(300, 4 * KV_BLOCK), 2, caller="s"), col)
        assert engine.wait_until(lambda s: s.active == 1, 60)  # prefilled: its first token; the second needs a step
        gate.freeze()
        assert gate.frozen.wait(60)
        engine.stop(timeout=0)  # the engine is stopping; the held iteration has yet to run
        gate.permit(1)
        gate.thaw()
        assert col.done.wait(60)
    finally:
        gate.thaw()
        engine.stop()
    assert not engine.alive
    assert col.final.finish is Finish.MAX_TOKENS and len(col.ids) == 2
    assert engine.prefix.stored_tokens == 0 and engine.stats().prefix_cache_bytes == 0
