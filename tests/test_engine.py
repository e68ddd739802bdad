"""The real Paddle engine in-process: correctness of the decoder, the slot cache and continuous batching."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from service.engine.api import EngineConfig
from service.engine.checkpoints.loader import LoadedModel
from service.engine.scheduler import Engine
from service.engine.tokenizer import IncrementalDetokenizer
from service.engine.types import Chunk, Finish, GenerationRequest, SamplingOptions
from tests.reference import NumpyLlama

PROMPTS = [
    "The quick brown fox",
    "你好，世界！今天",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived",
    "1, 2, 3, 4,",
    "床前明月光，疑是地上霜。",
    "Hello",
    "import numpy as np\nimport paddle\n",
]


def make_engine(model: LoadedModel, **overrides: object) -> Engine:
    values: dict = {"max_slots": 8, "max_prefill_tokens": 256, "max_context": 512}
    values.update(overrides)
    engine = Engine(model, EngineConfig(**values))
    engine.start(warmup=False)
    return engine


@pytest.fixture(scope="module")
def engine(loaded_model: LoadedModel) -> Iterator[Engine]:
    eng = make_engine(loaded_model)
    yield eng
    eng.stop()


class Collector:
    """Collects one stream's chunks on the engine thread; `done` is set by the final chunk."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.done = threading.Event()

    def __call__(self, batch: list[Chunk]) -> None:
        self.chunks.extend(batch)
        if any(c.finish is not None for c in batch):
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t.id for c in self.chunks for t in c.tokens]

    @property
    def final(self) -> Chunk:
        return self.chunks[-1]


def run_many(engine: Engine, reqs: list[GenerationRequest], timeout: float = 120) -> list[Collector]:
    collectors = [Collector() for _ in reqs]
    for req, col in zip(reqs, collectors, strict=True):
        engine.submit(req, col)
    for col in collectors:
        assert col.done.wait(timeout), "stream did not finish"
    return collectors


def greedy(model: LoadedModel, prompt: str, n: int = 16, **kw: object) -> GenerationRequest:
    return GenerationRequest(model.tokenizer.encode(prompt), n, **kw)  # type: ignore[arg-type]


def test_greedy_matches_independent_numpy_reference(engine: Engine, loaded_model: LoadedModel) -> None:
    ref = NumpyLlama(loaded_model.path)
    for prompt in PROMPTS[:3]:
        ids = loaded_model.tokenizer.encode(prompt)
        expected = ref.greedy(ids, 12)
        assert len(expected) >= 6, "reference hit a near-tie too early to be a useful check"
        (got,) = run_many(engine, [GenerationRequest(ids, 12)])
        assert got.ids[: len(expected)] == expected


def test_chunked_prefill_gives_the_same_tokens(loaded_model: LoadedModel, engine: Engine) -> None:
    prompt = " ".join(PROMPTS)  # ~70 tokens: 18 chunks of 4
    (one_shot,) = run_many(engine, [greedy(loaded_model, prompt, 12)])
    chunked_engine = make_engine(loaded_model, max_prefill_tokens=4)
    try:
        (chunked,) = run_many(chunked_engine, [greedy(loaded_model, prompt, 12)])
    finally:
        chunked_engine.stop()
    assert chunked.ids == one_shot.ids


def test_batch_output_equals_batch_one(engine: Engine, loaded_model: LoadedModel) -> None:
    solo = [run_many(engine, [greedy(loaded_model, p, 24)])[0].ids for p in PROMPTS]
    batched = run_many(engine, [greedy(loaded_model, p, 24) for p in PROMPTS])
    assert [c.ids for c in batched] == solo
    assert engine.wait_until(lambda s: s.active == 0 and s.used_positions == 0, 10)


def test_requests_join_and_leave_a_running_batch(engine: Engine, loaded_model: LoadedModel) -> None:
    long_req = greedy(loaded_model, PROMPTS[3], 80)
    short = [greedy(loaded_model, p, n) for p, n in zip(PROMPTS[:5], (3, 9, 17, 5, 30), strict=True)]
    solo_long = run_many(engine, [long_req])[0].ids
    solo_short = [run_many(engine, [r])[0].ids for r in short]

    long_col = Collector()
    engine.submit(long_req, long_col)
    # Join while the long stream is decoding: wait (on the engine's own steps) until it has produced tokens.
    assert engine.wait_until(lambda s: len(long_col.ids) >= 10 or long_col.done.is_set(), 30)
    joined = run_many(engine, short)  # they join, finish at different steps and leave; slots get repacked
    assert long_col.done.wait(60)
    assert [c.ids for c in joined] == solo_short
    assert long_col.ids == solo_long
    assert engine.wait_until(lambda s: s.active == 0, 10)


def test_cancel_inside_a_batch_leaves_the_others_unharmed(engine: Engine, loaded_model: LoadedModel) -> None:
    reqs = [greedy(loaded_model, p, 40) for p in PROMPTS[:4]]
    solo = [run_many(engine, [r])[0].ids for r in reqs]
    collectors = [Collector() for _ in reqs]
    handles = [engine.submit(r, c) for r, c in zip(reqs, collectors, strict=True)]
    assert engine.wait_until(lambda s: len(collectors[1].ids) >= 5, 30)
    handles[1].cancel()
    for c in collectors:
        assert c.done.wait(60)
    assert collectors[1].final.finish is Finish.CANCELLED
    assert collectors[1].final.completion_tokens < 40
    for i in (0, 2, 3):
        assert collectors[i].ids == solo[i]
    assert engine.wait_until(lambda s: s.active == 0, 10)


def test_mixed_sampling_rows_are_batch_independent(engine: Engine, loaded_model: LoadedModel) -> None:
    hot = SamplingOptions(temperature=0.9, top_k=50, top_p=0.9, seed=7)
    seeded = greedy(loaded_model, PROMPTS[0], 30, sampling=hot)
    alone = run_many(engine, [seeded])[0]
    again = run_many(engine, [seeded])[0]
    mixed = run_many(engine, [
        greedy(loaded_model, PROMPTS[1], 30),
        seeded,
        greedy(loaded_model, PROMPTS[2], 30, sampling=SamplingOptions(temperature=1.3, seed=99)),
        greedy(loaded_model, PROMPTS[5], 30, sampling=SamplingOptions(temperature=0.7, top_p=0.5)),
    ])
    assert alone.ids == again.ids == mixed[1].ids
    assert alone.final.seed == 7
    assert mixed[3].final.seed is not None  # an unseeded sampled request reports the seed it drew
    # Sampling really samples: a different seed gives a different continuation.
    other = run_many(engine, [greedy(loaded_model, PROMPTS[0], 30,
                                     sampling=SamplingOptions(temperature=0.9, top_k=50, top_p=0.9, seed=8))])[0]
    assert other.ids != alone.ids


def test_context_length_ends_the_stream(loaded_model: LoadedModel) -> None:
    eng = make_engine(loaded_model, max_context=64)
    try:
        ids = (loaded_model.tokenizer.encode(" ".join(PROMPTS)) * 2)[:60]
        (col,) = run_many(eng, [GenerationRequest(ids, 50)])
    finally:
        eng.stop()
    assert col.final.finish is Finish.CONTEXT_LENGTH
    assert col.final.completion_tokens == 4


def test_cache_capacity_grows_and_shrinks_with_the_longest_sequence(loaded_model: LoadedModel) -> None:
    eng = make_engine(loaded_model, max_context=512)
    try:
        start = eng.stats().cache_capacity
        col = Collector()
        eng.submit(GenerationRequest(loaded_model.tokenizer.encode("x " * 150), 20), col)
        assert eng.wait_until(lambda s: s.cache_capacity >= 256 or col.done.is_set(), 30)
        assert col.done.wait(60)
        grown = eng.stats().cache_capacity
        run_many(eng, [greedy(loaded_model, "short", 4)])
        assert grown >= 256 > start
        assert eng.stats().cache_capacity < grown
    finally:
        eng.stop()


def test_detokenizer_holds_back_split_characters(loaded_model: LoadedModel) -> None:
    tok = loaded_model.tokenizer
    text = "龘靐齉𠮷 and 🐍🦀 mixed 中文"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()), "expected rare characters to span several byte tokens"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1], "some token must have been held back mid-character"
