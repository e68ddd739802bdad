"""Prefix reuse across requests (service/engine/prefix_cache.py): exact, isolated per caller and salt, bounded."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from service.engine.checkpoints.loader import LoadedModel, load_model
from service.engine.kv_cache import SlotKVCache
from service.engine.prefix_cache import PrefixCache
from service.engine.scheduler import Engine
from service.engine.types import GenerationRequest, SamplingOptions
from tests.gguf_files import smollm2_file
from tests.support.engines import make_engine, run_many
from tests.support.http_front import client, grpc_text, model_name
from tests.support.servers import base_config, started
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

GREEDY = SamplingOptions()
SEEDED = SamplingOptions(temperature=0.8, top_k=40, seed=1234)


def turns(engine: Engine, first: list[int], follow_ups: list[list[int]], n: int,
          sampling: SamplingOptions = GREEDY, **kw: object) -> list[tuple[list[int], int]]:
    """A conversation: each turn's prompt is the last prompt, its reply and the next user tokens.
    Returns each turn's (generated ids, cached prompt tokens)."""
    out = []
    prompt = list(first)
    for extra in [[], *follow_ups]:
        prompt = prompt + extra
        (col,) = run_many(engine, [GenerationRequest(prompt, n, sampling=sampling, **kw)])  # type: ignore[arg-type]
        out.append((col.ids, col.final.cached_prompt_tokens))
        prompt = prompt + col.ids
    return out


def cached_tokens(engine: Engine, prompt: list[int], **kw: object) -> int:
    """The cached prompt tokens a short request for `prompt` reports."""
    (col,) = run_many(engine, [GenerationRequest(prompt, 2, **kw)])  # type: ignore[arg-type]
    return col.final.cached_prompt_tokens


def conversation(model: LoadedModel) -> tuple[list[int], list[list[int]]]:
    enc = model.tokenizer.encode
    first = enc("You are a helpful assistant. " * 12 + "Tell me about the sea.")
    return first, [enc(" And the mountains, please?"), enc(" What about rivers and lakes in winter?")]


@pytest.fixture(scope="module")
def engines(loaded_model: LoadedModel) -> Iterator[tuple[Engine, Engine]]:
    on, off = make_engine(loaded_model), make_engine(loaded_model, prefix_cache_mb=0)
    yield on, off
    on.stop()
    off.stop()


@pytest.mark.parametrize("sampling", [SamplingOptions(), SEEDED], ids=["greedy", "seeded"])
def test_reused_prefix_gives_the_same_tokens(engines: tuple[Engine, Engine], loaded_model: LoadedModel,
                                             sampling: SamplingOptions) -> None:
    on, off = engines
    first, rest = conversation(loaded_model)
    with_reuse = turns(on, first, rest, 20, sampling, caller=f"exact-{sampling.greedy}")
    without = turns(off, first, rest, 20, sampling)
    assert [ids for ids, _ in with_reuse] == [ids for ids, _ in without]
    assert all(cached == 0 for _, cached in without)
    assert with_reuse[0][1] == 0 and with_reuse[1][1] >= 32 and with_reuse[2][1] >= with_reuse[1][1]
    assert all(cached % 32 == 0 for _, cached in with_reuse)
    stats = on.stats()
    assert stats.prefix_hits >= 2 and stats.prefix_reused_tokens >= with_reuse[1][1] + with_reuse[2][1]


def test_prefixes_are_reused_only_by_the_same_caller_and_salt(engines: tuple[Engine, Engine],
                                                              loaded_model: LoadedModel) -> None:
    on, _ = engines
    prompt = loaded_model.tokenizer.encode("Isolation between tenants matters. " * 10)

    def cached(**kw: object) -> int:
        return cached_tokens(on, prompt, **kw)

    assert cached(caller="alice") == 0
    assert cached(caller="alice") > 0
    assert cached(caller="bob") == 0  # another caller may not time alice's prompts
    assert cached(caller="alice", cache_salt="s1") == 0  # a salt separates within a caller
    assert cached(caller="alice", cache_salt="s1") > 0


def test_shared_scope_reuses_across_callers(loaded_model: LoadedModel) -> None:
    eng = make_engine(loaded_model, prefix_cache_scope="shared")
    try:
        prompt = loaded_model.tokenizer.encode("A shared system prompt for everyone. " * 10)

        def cached(**kw: object) -> int:
            return cached_tokens(eng, prompt, **kw)

        assert cached(caller="alice") == 0
        assert cached(caller="bob") > 0
        assert cached(caller="bob", cache_salt="x") == 0  # the salt still separates
        assert eng.info.prefix_cache_scope == "shared"
    finally:
        eng.stop()


class _FakeCache:
    """Just what PrefixCache reads of a slot cache: 1 layer, 1 head, head_dim 1, positions numbered."""

    num_layers, kv_heads, head_dim, dtype = 1, 1, 1, "float32"

    def read_slot(self, slot: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(start, end, dtype=np.float32).reshape(1, 1, -1, 1)
        return rows, rows.copy()


def test_the_budget_evicts_the_biggest_holder_first() -> None:
    block_bytes = 2 * 4 * 4  # K and V, 4 positions of 4 bytes
    store = PrefixCache(budget_bytes=6 * block_bytes, block=4)
    cache = _FakeCache()
    small = np.arange(8)  # 2 blocks
    assert store.store(cache, 0, store.namespace("small", ""), "small", small) == 8  # type: ignore[arg-type]
    big = np.arange(100, 124)  # 6 blocks
    store.store(cache, 0, store.namespace("big", ""), "big", big)  # type: ignore[arg-type]
    assert store.nbytes <= store.budget
    assert store.owner_bytes()["small"] == 2 * block_bytes  # the big caller evicted its own blocks
    assert store.lookup(store.namespace("small", ""), small, 8).positions == 8
    assert store.lookup(store.namespace("big", ""), big, 24).positions == 16  # its oldest leaves went first
    assert store.lookup(store.namespace("small", ""), np.arange(1, 9), 8).positions == 0  # tokens must match


def test_a_store_never_evicts_a_caller_holding_no_more_than_the_one_storing() -> None:
    """A 3-block budget: quiet keeps 2 blocks, then flood stores 2 (4 in all). Both hold 2: the tie goes against the
    caller storing, which loses its oldest block, and quiet keeps both of its own."""
    block_bytes = 2 * 4 * 4
    store = PrefixCache(budget_bytes=3 * block_bytes, block=4)
    cache = _FakeCache()
    quiet, flood = np.arange(8), np.arange(50, 58)
    store.store(cache, 0, store.namespace("quiet", ""), "quiet", quiet)  # type: ignore[arg-type]
    store.store(cache, 0, store.namespace("flood", ""), "flood", flood)  # type: ignore[arg-type]
    assert store.owner_bytes() == {"quiet": 2 * block_bytes, "flood": block_bytes}
    assert store.lookup(store.namespace("quiet", ""), quiet, 8).positions == 8


def test_slot_copies_are_exact_and_touch_only_the_positions_named() -> None:
    """The cache's copies (the prefix cache's keep and restore, the packing move): the positions named, bit for bit,
    in a grown cache (its rows depend on capacity and slots), and nothing else."""
    cache = SlotKVCache(num_layers=3, max_slots=4, kv_heads=2, head_dim=8, max_context=256, dtype="float32")
    cache.ensure(100, 4)
    assert (cache.capacity, cache.slots) == (128, 4)
    rng = np.random.default_rng(7)
    k, v = (rng.standard_normal([3, 2, 40, 8]).astype(np.float32) for _ in range(2))
    cache.write_slot(2, 32, k, v)
    cache.move(2, 0, 72)

    def expected_slot(slot: int) -> np.ndarray:
        out = np.zeros([2, 3, 2, cache.capacity, 8], dtype=np.float32)  # K and V
        if slot in (0, 2):
            out[0, :, :, 32:72], out[1, :, :, 32:72] = k, v
        return out

    for slot in range(4):
        assert np.array_equal(np.stack(cache.read_slot(slot, 0, cache.capacity)), expected_slot(slot)), slot
    part_k, part_v = cache.read_slot(0, 40, 50)
    assert np.array_equal(part_k, k[:, :, 8:18]) and np.array_equal(part_v, v[:, :, 8:18])
    # A read is a copy, also where the positions read lie contiguous in the storage (one layer, one head).
    single = SlotKVCache(num_layers=1, max_slots=1, kv_heads=1, head_dim=8, max_context=64, dtype="float32")
    ones = np.ones([1, 1, 32, 8], dtype=np.float32)
    single.write_slot(0, 0, ones, ones)
    kept, _ = single.read_slot(0, 0, 32)
    single.write_slot(0, 0, 2 * ones, 2 * ones)
    assert np.array_equal(kept, ones)


@pytest.fixture(scope="module")
def smollm2() -> LoadedModel:
    return load_model(smollm2_file())


@pytest.mark.parametrize("sampling", [SamplingOptions(), SEEDED], ids=["greedy", "seeded"])
def test_smollm2_chat_turns_are_token_identical_with_reuse(smollm2: LoadedModel, sampling: SamplingOptions) -> None:
    on, off = make_engine(smollm2), make_engine(smollm2, prefix_cache_mb=0)
    try:
        first, rest = conversation(smollm2)
        with_reuse = turns(on, first, rest, 24, sampling)
        without = turns(off, first, rest, 24, sampling)
    finally:
        on.stop()
        off.stop()
    assert [ids for ids, _ in with_reuse] == [ids for ids, _ in without]
    assert with_reuse[1][1] > 0 and with_reuse[2][1] >= with_reuse[1][1]


def test_both_fronts_report_cached_prompt_tokens_and_take_a_salt(model_dir: Path) -> None:
    srv = started(base_config(model_dir, http_port=-1))
    try:
        prompt = "Both fronts report reused prompt tokens. " * 10
        req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=2), cache_salt="t")
        _, first = grpc_text(srv, req)
        _, second = grpc_text(srv, req)
        assert first.usage.cached_prompt_tokens == 0 and second.usage.cached_prompt_tokens > 0
        assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens
        sdk = client(srv)
        body = {"model": model_name(srv), "prompt": prompt, "max_tokens": 2, "temperature": 0}
        other_salt = sdk.completions.create(**body, extra_body={"cache_salt": "u"})  # type: ignore[call-overload]
        assert other_salt.usage.prompt_tokens_details.cached_tokens == 0
        same_salt = sdk.completions.create(**body, extra_body={"cache_salt": "t"})  # type: ignore[call-overload]
        assert same_salt.usage.prompt_tokens_details.cached_tokens == second.usage.cached_prompt_tokens
        assert srv.engine.info.prefix_cache_bytes > 0 and srv.engine.info.prefix_cache_scope == "caller"
    finally:
        srv.close()


def test_metrics_count_lookups_hits_and_reused_tokens_and_model_info_states_the_policy(model_dir: Path) -> None:
    """The counters say what happened: two lookups of the same prompt, one hit, the reused positions equal to what
    the second request's usage reports; GetModelInfo states the policy the engine runs."""
    from prometheus_client.parser import text_string_to_metric_families

    srv = started(base_config(model_dir, metrics_port=-1, prefix_cache_scope="shared"))
    try:
        req = pb.GenerateRequest(prompt="Counted prompt tokens, block by block. " * 10,
                                 stopping=pb.StoppingCriteria(max_new_tokens=2))
        grpc_text(srv, req)
        _, second = grpc_text(srv, req)
        assert srv.engine.wait_until(lambda s: s.active == 0, 60)
        body = urllib.request.urlopen(f"http://127.0.0.1:{srv.running.metrics_port}/metrics", timeout=10).read()
        seen = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert seen["tokenstream_prefix_cache_queries_total"] == 2
        assert seen["tokenstream_prefix_cache_hits_total"] == 1
        assert seen["tokenstream_prefix_cache_reused_tokens_total"] == second.usage.cached_prompt_tokens > 0
        assert seen["tokenstream_prefix_cache_bytes"] > 0
        with srv.channel() as ch:
            info = pb_grpc.GenerationServiceStub(ch).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        policy = info.prefix_cache
        assert (policy.budget_bytes, policy.block_positions, policy.scope) == (1024 << 20, 32, "shared")
    finally:
        srv.close()


def test_the_span_counts_the_reused_prompt_tokens(model_dir: Path) -> None:
    from tests.support.tracing import Spans

    spans = Spans()
    srv = started(base_config(model_dir), tracer_provider=spans.provider)
    try:
        req = pb.GenerateRequest(prompt="A traced prompt, reused the second time. " * 10,
                                 stopping=pb.StoppingCriteria(max_new_tokens=2))
        grpc_text(srv, req)
        _, second = grpc_text(srv, req)
        first_span, second_span = sorted(spans.finished("/tokenstream.v1.GenerationService/Generate", count=2),
                                         key=lambda s: s.start_time or 0)
        assert dict(first_span.attributes or {})["tokenstream.usage.cached_input_tokens"] == 0
        reused = dict(second_span.attributes or {})["tokenstream.usage.cached_input_tokens"]
        assert reused == second.usage.cached_prompt_tokens > 0
    finally:
        srv.close()
