"""The per-sequence logic without Paddle, the engine boundary's imports, and the reaping race (#11)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import paddle

from service.engine.api import EngineConfig
from service.engine.checkpoints.loader import LoadedModel
from service.engine.delivery import StreamHandle
from service.engine.scheduler import Engine
from service.engine.sequence import SLOW_READER, SequenceState, verdict
from service.engine.tokenizer import Tokenizer
from service.engine.types import Finish, GenerationRequest

ROOT = Path(__file__).resolve().parents[1]



def seq_for(tok: Tokenizer, prompt: str = "hi", max_new: int = 8, max_context: int = 512, eos: tuple[int, ...] = (),
            **kw: object) -> SequenceState:
    req = GenerationRequest(tok.encode(prompt), max_new, **kw)  # type: ignore[arg-type]
    return SequenceState(req, tok, eos, max_context, arrival_ns=1,
                         handle=StreamHandle(lambda _: None, None, paced=True))


def feed(seq: SequenceState, ids: list[int]) -> list:
    return [c for i, t in enumerate(ids) if (c := seq.accept(t, now_ns=10 + i)) is not None]


def test_eos_wins_over_max_tokens_and_is_never_text(tok: Tokenizer) -> None:
    eos = tok.encode("!")[0]
    seq = seq_for(tok, max_new=2, eos=(eos,))
    chunks = feed(seq, [*tok.encode("A"), eos])
    assert chunks[-1].finish is Finish.EOS_TOKEN and seq.finished
    assert "!" not in "".join(c.text for c in chunks)
    assert [t.id for c in chunks for t in c.tokens][-1] == eos


def test_stop_sequence_wins_over_max_tokens_on_the_same_token(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    seq = seq_for(tok, max_new=len(ids), stop_sequences=("three",))
    chunks = feed(seq, ids)
    assert chunks[-1].finish is Finish.STOP_SEQUENCE and chunks[-1].stop_sequence == "three"
    assert "".join(c.text for c in chunks) == "one two "


def test_stop_sequences_are_ignored_until_min_new_tokens(tok: Tokenizer) -> None:
    """vLLM's min_tokens: a stop in the first min_new_tokens tokens' text does not end the stream (nor is that
    text held back); the first stop after them does."""
    ids = tok.encode(" x y x y x")
    assert len(ids) == 5, "one token per word"
    def until_final(min_new: int) -> list:
        seq = seq_for(tok, max_new=len(ids), stop_sequences=("x",), min_new_tokens=min_new)
        chunks = []
        for i, t in enumerate(ids):
            if (c := seq.accept(t, now_ns=10 + i)) is not None:
                chunks.append(c)
            if seq.finished:
                return chunks
        raise AssertionError("no final message")

    chunks = until_final(3)
    assert chunks[-1].finish is Finish.STOP_SEQUENCE and chunks[-1].completion_tokens == 3
    assert "".join(c.text for c in chunks) == " x y "
    assert until_final(1)[-1].completion_tokens == 1  # armed from the first token


def test_max_tokens_wins_over_the_context_on_the_same_token(tok: Tokenizer) -> None:
    prompt = tok.encode("hi")
    seq = seq_for(tok, max_new=3, max_context=len(prompt) + 3)
    assert feed(seq, tok.encode(" a b c"))[-1].finish is Finish.MAX_TOKENS
    seq = seq_for(tok, max_new=5, max_context=len(prompt) + 3)
    chunks = feed(seq, tok.encode(" a b c"))
    assert chunks[-1].finish is Finish.CONTEXT_LENGTH and chunks[-1].completion_tokens == 3


def test_held_text_is_released_by_the_final_message(tok: Tokenizer) -> None:
    ids = tok.encode("abc xy")
    seq = seq_for(tok, max_new=len(ids), stop_sequences=("xyz",))  # "xy" could still begin the stop
    chunks = feed(seq, ids)
    assert chunks[-1].finish is Finish.MAX_TOKENS
    assert chunks[-1].text.endswith("xy") and "".join(c.text for c in chunks) == "abc xy"


def test_a_split_character_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode("龘")
    assert len(ids) > 1, "the rare character must span several byte tokens"
    seq = seq_for(tok, max_new=len(ids) + 1)
    chunks = feed(seq, ids)
    assert len(chunks) == 1 and chunks[0].text == "龘" and len(chunks[0].tokens) == len(ids)


def test_first_token_time_and_usage(tok: Tokenizer) -> None:
    seq = seq_for(tok, max_new=2)
    chunks = feed(seq, tok.encode(" a b"))
    final = chunks[-1]
    assert final.timings is not None and final.timings.first_token_ns == 10 and final.timings.end_ns == 11
    assert (final.prompt_tokens, final.completion_tokens) == (len(tok.encode("hi")), 2)


def test_verdict_precedence(tok: Tokenizer) -> None:
    seq = seq_for(tok, deadline=5.0)
    seq.handle.last_read = 3.0
    assert verdict(seq, now_monotonic=4.0, max_backlog=0, slow_reader_s=5) is None
    seq.handle.emitted = 1  # one message waits: not slow until the reader has been away for slow_reader_s
    assert verdict(seq, 4.0, max_backlog=2, slow_reader_s=5) is None
    assert verdict(seq, 4.0, max_backlog=2, slow_reader_s=0.5) == (Finish.ERROR, f"{SLOW_READER}: no message taken "
                                                                   "for 0.5 s")
    seq.handle.emitted = 3
    assert verdict(seq, 4.0, max_backlog=2, slow_reader_s=5) == (Finish.ERROR, f"{SLOW_READER}: stream buffer "
                                                                 "limit reached")
    assert verdict(seq, 6.0, max_backlog=2, slow_reader_s=5) == (Finish.TIME_LIMIT, "")
    seq.handle.cancel()
    assert verdict(seq, 6.0, max_backlog=2, slow_reader_s=5) == (Finish.CANCELLED, "")
    waiting = seq_for(tok)  # a reader waiting for its first message, however long the request queued, is not behind
    waiting.handle.reading, waiting.handle.last_read, waiting.handle.emitted = True, 0.0, 1
    assert verdict(waiting, 1e9, max_backlog=2, slow_reader_s=0.5) is None
    unpaced = seq_for(tok)
    unpaced.handle.paced, unpaced.handle.emitted = False, 10**6  # a plain callback consumes as it is called
    assert verdict(unpaced, 1e9, max_backlog=2, slow_reader_s=0.5) is None


def test_a_stream_reads_while_it_waits_for_a_message() -> None:
    """AsyncStream marks its handle as reading while the consumer awaits a chunk, and not once it has one."""
    import asyncio

    from service.engine.delivery import AsyncStream
    from service.engine.types import Chunk

    async def scenario() -> tuple[bool, bool]:
        handles: list[StreamHandle] = []

        def submit(deliver: object, loop: object, paced: bool) -> StreamHandle:
            handles.append(StreamHandle(deliver, loop, paced))  # type: ignore[arg-type]
            return handles[-1]

        stream = AsyncStream(submit)
        waiter = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)  # one loop turn: the consumer is now awaiting its first chunk
        waiting = handles[0].reading
        handles[0].deliver([Chunk("a")])
        await waiter
        return waiting, handles[0].reading

    assert asyncio.run(scenario()) == (True, False)


class FlipFlopHandle(StreamHandle):
    """Far behind on one read of `consumed`, caught up on the next: a consumer racing the engine thread."""

    @property  # type: ignore[override]
    def consumed(self) -> int:
        self.reads = getattr(self, "reads", 0) + 1
        return 0 if self.reads % 2 else self.emitted

    @consumed.setter
    def consumed(self, value: int) -> None:
        pass


def test_a_verdict_that_changes_between_reads_ends_one_stream_not_the_batch(loaded_model: LoadedModel) -> None:
    """Regression: _reap computed the verdict twice; when the second disagreed, `_finish(seq, *None)` raised and the
    engine ended every stream in the batch with ERROR."""
    engine = Engine(loaded_model, EngineConfig(max_slots=4, max_context=256, max_backlog=1))
    got: dict[str, list] = {"a": [], "b": []}
    ids = loaded_model.tokenizer.encode("hello there")
    steady = engine.submit(GenerationRequest(ids, 20, request_id="a"), got["a"].extend, paced=True)
    racy = engine.submit(GenerationRequest(ids, 20, request_id="b"), got["b"].extend, paced=True)
    with paddle.no_grad():
        for _ in range(2):  # both prefilled and decoded: two chunks each, one more than max_backlog
            engine._iteration()  # driven here rather than on the engine thread
            engine._outbox.publish()
        assert (steady.emitted, racy.emitted) == (2, 2)
        steady.consumed = steady.emitted  # this reader keeps up
        racy.__class__ = FlipFlopHandle
        engine._iteration()
        engine._outbox.publish()
    final_b = got["b"][-1]
    assert final_b.finish is Finish.ERROR and SLOW_READER in final_b.error
    assert not any(c.finish for c in got["a"]) and engine.stats().active == 1


def test_the_transport_facing_modules_import_neither_paddle_nor_the_engine_grpc() -> None:
    code = (
        "import sys\n"
        "import service.engine.api, service.engine.sequence, service.engine.delivery, service.engine.hooks\n"
        "import service.generation, service.servicer, service.errors, service.validation, service.metrics\n"
        "assert 'paddle' not in sys.modules, 'a transport-facing module imported paddle'\n"
        "import service.engine.scheduler\n"
        "assert 'grpc' in sys.modules  # the transport above imported it\n"
    )
    env = {"PYTHONPATH": f"{ROOT / 'generated'}:{ROOT}"}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True)
    no_grpc = "import sys\nimport service.engine.scheduler\nassert 'grpc' not in sys.modules, 'the engine imports grpc'"
    subprocess.run([sys.executable, "-c", no_grpc], cwd=ROOT, env=env, check=True)
