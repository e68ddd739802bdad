"""The real Paddle engine in-process: correctness of the decoder, the slot cache and continuous batching."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from service.engine.checkpoints.loader import LoadedModel
from service.engine.scheduler import Engine
from service.engine.tokenizer import IncrementalDetokenizer
from service.engine.types import Finish, GenerationRequest, SamplingOptions
from tests.reference import NumpyLlama
from tests.support.engines import Collector, make_engine, run_many
from tests.support.hooks import StepGate

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


@pytest.fixture(scope="module")
def engine(loaded_model: LoadedModel) -> Iterator[Engine]:
    eng = make_engine(loaded_model)
    yield eng
    eng.stop()


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


def test_requests_join_and_leave_a_running_batch(loaded_model: LoadedModel) -> None:
    """Five short streams join a long one after its 10th decode step (the gate holds decode steps while they are
    prefilled beside it), then finish at different steps and leave while it goes on. Every decode step's batch is
    what that schedule makes it, and every stream's tokens are its solo run's."""
    lengths = (3, 9, 17, 5, 30)
    long_req = greedy(loaded_model, PROMPTS[3], 80)
    short = [greedy(loaded_model, p, n) for p, n in zip(PROMPTS[:5], lengths, strict=True)]
    gate = StepGate(gated=True)
    eng = make_engine(loaded_model, hooks=gate)
    try:
        gate.open()
        solo_long = run_many(eng, [long_req])[0].ids
        solo_short = [run_many(eng, [r])[0].ids for r in short]
        assert [len(solo_long), *map(len, solo_short)] == [80, *lengths]  # no early EOS: the schedule below holds
        gate.close()
        before = eng.stats()
        long_col = Collector()
        eng.submit(long_req, long_col)
        assert eng.wait_until(lambda s: s.active == 1, 30)  # prefilled: its first token
        gate.permit(10)
        assert eng.wait_until(lambda s: s.steps == before.steps + 10, 30)  # 11 tokens of 80: running
        joined = [Collector() for _ in short]
        for req, col in zip(short, joined, strict=True):
            eng.submit(req, col)
        # They are prefilled while the long stream holds its slot; no decode step runs until the gate opens.
        assert eng.wait_until(lambda s: s.active == 6 and s.prefilling == 0 and s.waiting == 0, 30)
        assert len(long_col.ids) == 11
        gate.open()
        for col in [long_col, *joined]:
            assert col.done.wait(60)
        assert eng.wait_until(lambda s: s.active == 0 and s.used_positions == 0, 10)  # every slot freed
        after = eng.stats()
    finally:
        eng.stop()
    batches = Counter({rows: after.batch_sizes[rows] - before.batch_sizes[rows]
                       for rows in range(len(after.batch_sizes))})
    # 10 steps of the long stream alone; then at step k, the long one and each short one still short of its end.
    expected = Counter({1: 10})
    for k in range(1, 80 - 11 + 1):
        expected[1 + sum(n - 1 >= k for n in lengths)] += 1
    assert +batches == expected
    assert [c.ids for c in joined] == solo_short
    assert long_col.ids == solo_long


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
    # An unseeded sampled request reports the seed it drew: given back, in the same batch, it draws the same tokens.
    # (Top-p 0.5 over this random model's flat distribution cuts among thousands of near-equal candidates, where
    # another batch's last-bit logit changes can move the cut: README "The contract" says so.)
    drawn = mixed[3].final.seed
    replay = run_many(engine, [
        greedy(loaded_model, PROMPTS[1], 30),
        seeded,
        greedy(loaded_model, PROMPTS[2], 30, sampling=SamplingOptions(temperature=1.3, seed=99)),
        greedy(loaded_model, PROMPTS[5], 30, sampling=SamplingOptions(temperature=0.7, top_p=0.5, seed=drawn)),
    ])[3]
    assert replay.ids == mixed[3].ids and replay.final.seed == drawn
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
