"""The Python SDK, sync and asyncio, against the real server with the real engine."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from tests.support.hooks import StepGate
from tests.support.servers import base_config, started
from tokenstream_client import AsyncClient, Client, Delta, FinishReason, TokenstreamError

PROMPT = "你好世界 Hello"
LONG = 400  # tokens; the test context holds 512
HELD_STEPS = 20  # decode steps a held stream gets: it is still running, far from LONG, whatever the machine
# The server ends a stream gracefully this long before the caller's deadline: a wide margin, so that its final
# message (TIME_LIMIT) reaches the client well before the deadline, however slow the machine.
DEADLINE_MARGIN_S = 10
DEADLINE_S = DEADLINE_MARGIN_S + 1.0  # the server ends the stream after about a second


@pytest.fixture(scope="module")
def server(model_dir: Any) -> Iterator[Any]:
    """Overrides tests/conftest.py's: the same server, whose decode steps follow a gate (open unless `held`), with
    a wide deadline margin."""
    srv = started(base_config(model_dir, deadline_margin_ms=DEADLINE_MARGIN_S * 1000), hooks=StepGate())
    yield srv
    srv.close()


@pytest.fixture
def held(server: Any) -> Iterator[StepGate]:
    """Streams get HELD_STEPS decode steps, then wait: a LONG answer is still running when the test acts on it."""
    gate = server.hooks
    gate.close()
    gate.permit(HELD_STEPS)
    yield gate
    gate.open()


@pytest.fixture
def frozen(server: Any) -> Iterator[StepGate]:
    """The engine thread stopped: the server admits a stream but can send nothing for it until the test ends."""
    gate = server.hooks
    gate.freeze()
    assert gate.frozen.wait(30)
    yield gate
    gate.thaw()


@pytest.fixture
def client(server: Any) -> Iterator[Client]:
    with Client(server.target, timeout=60) as c:
        yield c


def assert_consistent(deltas: list[Delta], loaded_model: Any, max_new_tokens: int) -> None:
    ids = [i for d in deltas for i in d.token_ids]
    final = deltas[-1]
    assert [d.is_final for d in deltas] == [False] * (len(deltas) - 1) + [True]
    assert final.finish_reason is FinishReason.MAX_TOKENS
    assert final.usage is not None and final.usage.completion_tokens == len(ids) == max_new_tokens
    assert final.usage.prompt_tokens == len(loaded_model.tokenizer.encode(PROMPT))
    assert final.timings is not None and final.timings.total_ms > 0
    assert "".join(d.text for d in deltas) == loaded_model.tokenizer.decode(ids)


def no_active_streams(server: Any) -> bool:
    return bool(server.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, timeout=10))


# -- sync ----------------------------------------------------------------------------------------------------------


def test_generate_deltas_concatenate_to_decode(client: Client, loaded_model: Any) -> None:
    deltas = list(client.generate(PROMPT, max_new_tokens=20))
    assert_consistent(deltas, loaded_model, 20)


def test_generate_text_collects_the_stream(client: Client, loaded_model: Any) -> None:
    result = client.generate_text(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    assert result.finish_reason is FinishReason.MAX_TOKENS
    assert len(result.token_ids) == result.usage.completion_tokens == 12
    assert result.text == loaded_model.tokenizer.decode(list(result.token_ids))
    assert result.seed == 1234 and result.attempts == 1
    again = client.generate_text(PROMPT, max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
    assert again.token_ids == result.token_ids  # same seed, same tokens


def test_stream_result_covers_iterated_deltas(client: Client) -> None:
    with client.generate(PROMPT, max_new_tokens=8) as stream:
        first = next(stream)
        result = stream.collect()
    assert result.token_ids[: len(first.token_ids)] == tuple(first.token_ids)
    assert len(result.token_ids) == 8


def test_a_deadline_the_server_meets_ends_with_time_limit(client: Client, server: Any, held: StepGate) -> None:
    result = client.generate_text(PROMPT, max_new_tokens=LONG, timeout=DEADLINE_S)
    assert result.finish_reason is FinishReason.TIME_LIMIT and result.attempts == 1
    assert result.usage.completion_tokens == len(result.token_ids) <= HELD_STEPS + 1  # the text so far
    assert no_active_streams(server)


def test_a_deadline_the_server_cannot_meet_is_deadline_exceeded(client: Client, server: Any,
                                                                frozen: StepGate) -> None:
    with pytest.raises(TokenstreamError) as info:
        client.generate_text(PROMPT, max_new_tokens=LONG, timeout=1.0)
    assert (info.value.code, info.value.attempts) == (grpc.StatusCode.DEADLINE_EXCEEDED, 1)  # not retried
    frozen.thaw()
    assert no_active_streams(server)


def test_closing_the_iterator_cancels_the_call(client: Client, server: Any, held: StepGate) -> None:
    stream = client.generate(PROMPT, max_new_tokens=LONG)
    assert 1 <= len(next(stream).token_ids) <= HELD_STEPS + 1
    assert server.engine.stats().active == 1  # still running: held after HELD_STEPS steps
    stream.close()
    assert no_active_streams(server)
    with pytest.raises(StopIteration):
        next(stream)


def test_breaking_out_of_a_with_block_cancels_the_call(client: Client, server: Any, held: StepGate) -> None:
    with client.generate(PROMPT, max_new_tokens=LONG) as stream:
        for _ in stream:
            break
    assert no_active_streams(server)


def test_a_garbage_collected_stream_cancels_the_call(client: Client, server: Any, held: StepGate) -> None:
    stream = client.generate(PROMPT, max_new_tokens=LONG)
    next(stream)
    assert server.engine.stats().active == 1
    del stream
    gc.collect()
    assert no_active_streams(server)


def test_request_id_metadata_is_accepted(client: Client) -> None:
    stream = client.generate(PROMPT, max_new_tokens=4, request_id="client-test-0001", metadata={"x-extra": "1"})
    result = stream.collect()
    assert result.request_id == stream.request_id == "client-test-0001"
    assert result.finish_reason is FinishReason.MAX_TOKENS


def test_invalid_argument_carries_field_violations(client: Client) -> None:
    with pytest.raises(TokenstreamError) as info:
        client.generate_text(PROMPT, top_p=2.0, stop=["ok", ""])
    error = info.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.attempts == 1
    assert {v.field for v in error.field_violations} == {"sampling.top_p", "stopping.stop_sequences[1]"}


def test_tokenize(client: Client, loaded_model: Any) -> None:
    text = "Hello world, 你好"
    result = client.tokenize(text, return_tokens=True, return_offsets=True)
    assert list(result.ids) == loaded_model.tokenizer.encode(text)
    assert result.token_count == len(result.ids) == len(result.tokens) == len(result.offsets)
    assert result.offsets[0][0] == 0 and result.offsets[-1][1] == len(text)
    assert client.tokenize(text, truncate_to=2).ids == result.ids[-2:]


def test_model_info(client: Client, server: Any, loaded_model: Any) -> None:
    info, engine = client.model_info(), server.engine.info
    assert info.vocab_size == 151_936 and info.architecture == loaded_model.config.architecture
    assert info.max_context_length == 512 and info.max_batch_size == 8
    assert (info.model_name, info.eos_token_ids, info.dtype, info.device) == (
        engine.name, engine.eos_token_ids, engine.dtype, engine.device)
    assert set(loaded_model.config.eos_token_ids) <= set(info.eos_token_ids)


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("tokenstream.v1.GenerationService") == "SERVING"


# -- asyncio -------------------------------------------------------------------------------------------------------


def test_async_generate_and_collect(server: Any, loaded_model: Any) -> None:
    async def run() -> tuple[list[Delta], Any, Any, str, Any, Any]:
        async with AsyncClient(server.target, timeout=60) as client:
            deltas = [d async for d in client.generate(PROMPT, max_new_tokens=16)]
            result = await client.generate_text(PROMPT, max_new_tokens=16)
            return (deltas, result, await client.tokenize("Hello"), await client.health(),
                    await client.model_info(), loaded_model)

    deltas, result, tokens, health, info, _ = asyncio.run(run())
    assert_consistent(deltas, loaded_model, 16)
    assert result.token_ids == tuple(i for d in deltas for i in d.token_ids)  # greedy: the same tokens
    assert result.text == "".join(d.text for d in deltas)
    assert list(tokens.ids) == loaded_model.tokenizer.encode("Hello")
    assert health == "SERVING" and info.vocab_size == 151_936


def test_async_deadlines(server: Any, held: StepGate) -> None:
    async def run(timeout: float) -> Any:
        async with AsyncClient(server.target) as client:
            return await client.generate_text(PROMPT, max_new_tokens=LONG, timeout=timeout)

    result = asyncio.run(run(DEADLINE_S))
    assert result.finish_reason is FinishReason.TIME_LIMIT and result.usage.completion_tokens <= HELD_STEPS + 1
    held.freeze()
    assert held.frozen.wait(30)
    try:
        with pytest.raises(TokenstreamError) as info:
            asyncio.run(run(1.0))
    finally:
        held.thaw()
    assert (info.value.code, info.value.attempts) == (grpc.StatusCode.DEADLINE_EXCEEDED, 1)
    assert no_active_streams(server)


def test_async_aclose_cancels_the_call(server: Any, held: StepGate) -> None:
    async def run() -> bool:
        async with AsyncClient(server.target, timeout=60) as client:
            stream = client.generate(PROMPT, max_new_tokens=LONG)
            async for _ in stream:
                break
            await stream.aclose()
            return await asyncio.to_thread(no_active_streams, server)

    assert asyncio.run(run())


def test_async_cancel_from_another_task_ends_the_iteration(server: Any, held: StepGate) -> None:
    async def run() -> tuple[int, bool]:
        async with AsyncClient(server.target, timeout=60) as client:
            stream = client.generate(PROMPT, max_new_tokens=LONG)
            got_one = asyncio.Event()
            count = 0

            async def consume() -> None:
                nonlocal count
                async for _ in stream:
                    count += 1
                    got_one.set()

            task = asyncio.create_task(consume())
            await got_one.wait()
            stream.cancel()
            await task  # ends quietly: no CancelledError, no error
            return count, await asyncio.to_thread(no_active_streams, server)

    count, idle = asyncio.run(run())
    assert 1 <= count <= HELD_STEPS + 1 and idle


def test_async_garbage_collected_stream_cancels_the_call(server: Any, held: StepGate) -> None:
    async def run() -> bool:
        async with AsyncClient(server.target, timeout=60) as client:
            stream = client.generate(PROMPT, max_new_tokens=LONG)
            await stream.__anext__()
            del stream
            gc.collect()
            return await asyncio.to_thread(no_active_streams, server)

    assert asyncio.run(run())


def test_async_task_cancellation_cancels_the_call(server: Any, held: StepGate) -> None:
    async def run() -> bool:
        async with AsyncClient(server.target, timeout=60) as client:
            started = asyncio.Event()

            async def consume() -> None:
                async for _ in client.generate(PROMPT, max_new_tokens=LONG):
                    started.set()

            task = asyncio.create_task(consume())
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task  # the task's own cancellation is not swallowed
            return await asyncio.to_thread(no_active_streams, server)

    assert asyncio.run(run())


def test_the_sdk_sends_one_authorization_entry() -> None:
    """A server refuses a call with two `authorization` entries: token= and an authorization metadata entry
    (the client's or the call's) make one, the most specific."""
    from tokenstream_client.channel import call_metadata

    def authorization(**kwargs: Any) -> list[Any]:
        return [v for k, v in call_metadata(request_id="r", **kwargs) if k == "authorization"]

    assert authorization(token="a") == ["Bearer a"]
    assert authorization(token="a", extra=[("Authorization", "Bearer b")]) == ["Bearer b"]
    assert authorization(token="a", base={"authorization": "Bearer c"}, extra=[("authorization", "Bearer b")]) == [
        "Bearer b"]
    assert authorization(token=None) == []
