"""Decode rows attend over their own lengths (Attention.decode_groups), not the capacity the longest row set.

The suite's model (2 layers, GQA 4/2, real Qwen2 vocabulary, random weights) decodes 8 rows of mixed lengths, one
far longer than the others, with the grouping on and off over identical caches: the logits must agree to float32
rounding, and the grouping must really have been taken (two groups, keys gathered), or the test proves nothing. It runs
on the step with plain kernels (what every CPU runs) and again with the fused ones where this CPU proved them.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.checkpoints.loader import LoadedModel
from service.engine.decoder import DecoderOptions, LlamaDecoder, PrefillChunk
from service.engine.kernels import Kernels, choose
from service.engine.kv_cache import SlotKVCache

MAX_CONTEXT = 512
TOL = 1e-4
LENGTHS = [12, 30, 7, 400, 3, 64, 18, 9]  # prompt lengths; the long one in slot 3, so the groups reorder rows


def prefilled(model: LoadedModel, dec: LlamaDecoder, prompts: list[np.ndarray]) -> SlotKVCache:
    cfg = model.config
    cache = SlotKVCache(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, MAX_CONTEXT, "float32")
    cache.ensure(max(len(p) for p in prompts) + 8, len(prompts) + 1)
    for slot, p in enumerate(prompts):
        dec.prefill(cache, slot, p, 0, want_logits=False)
    return cache


@pytest.fixture(params=["plain", "auto"])
def kernels(request: pytest.FixtureRequest) -> Kernels:
    """The step with plain kernels (every CPU runs them), and with the fused ones this CPU proved, if any."""
    chosen = Kernels.from_choices(choose(request.param))
    if request.param == "auto" and chosen == Kernels():
        pytest.skip("no fused kernel runs on this CPU: the plain case covers it")
    return chosen


def test_mixed_lengths_match_the_padded_attention(loaded_model: LoadedModel, kernels: Kernels) -> None:
    cfg, w = loaded_model.config, loaded_model.weights
    rng = np.random.default_rng(7)
    prompts = [rng.integers(4, cfg.vocab_size, n).astype(np.int64) for n in LENGTHS]
    padded = LlamaDecoder(cfg, w, MAX_CONTEXT, "float32", kernels=kernels, options=DecoderOptions(true_lengths=False))
    grouped = LlamaDecoder(cfg, w, MAX_CONTEXT, "float32", kernels=kernels)
    assert grouped.fast and grouped.kernels == kernels, "the one-forward step is the path under test"
    ref_cache, new_cache = prefilled(loaded_model, padded, prompts), prefilled(loaded_model, padded, prompts)
    assert new_cache.capacity == 512
    tokens = np.array([int(p[-1]) for p in prompts], dtype=np.int64)
    positions = np.array(LENGTHS, dtype=np.int64)

    groups, order = grouped.attention.decode_groups(new_cache, positions)
    spans = [int(g.mask.shape[-1]) for g in groups]
    assert [int(g.mask.shape[0]) for g in groups] == [7, 1]
    assert spans == [96, 512]  # the short rows over 65 positions rounded up to 96, the long one over all 512
    assert all(g.blocks is not None for g in groups)
    assert order is not None

    worst = 0.0
    for _ in range(4):
        want = padded.decode_step(ref_cache, tokens, positions)
        got = grouped.decode_step(new_cache, tokens, positions)
        worst = max(worst, float(np.abs(want - got).max()))
        assert (want.argmax(-1) == got.argmax(-1)).all()
        tokens, positions = want.argmax(-1).astype(np.int64), positions + 1
    # Decode rows and a prompt chunk (slot 8) in one step: the chunk's rows follow the grouped decode rows.
    extra = rng.integers(4, cfg.vocab_size, 11).astype(np.int64)
    want, (want_chunk,) = padded.step(ref_cache, tokens, positions, [PrefillChunk(8, extra, 0, True)])
    got, (got_chunk,) = grouped.step(new_cache, tokens, positions, [PrefillChunk(8, extra, 0, True)])
    assert want is not None and got is not None
    assert want_chunk is not None and got_chunk is not None
    worst = max(worst, float(np.abs(want - got).max()), float(np.abs(want_chunk - got_chunk).max()))
    assert np.abs(want).max() > 1.0, "logits too flat to tell a wrong attention apart"
    assert worst < TOL
    # The K/V the two wrote (from the attention outputs of the layer below) agree too.
    for i in range(cfg.num_layers):
        for a, b in zip(ref_cache.layer(i), new_cache.layer(i), strict=True):
            assert float((a - b).abs().max()) < TOL


def test_uniform_and_single_rows_keep_attending_on_the_cache_itself(loaded_model: LoadedModel) -> None:
    """No copy where the cost model says it cannot pay: 32 rows at 85 of 128 positions, 8 rows at 140 of 256, one
    row, one short row beside a long one."""
    cfg = loaded_model.config
    dec = LlamaDecoder(cfg, loaded_model.weights, MAX_CONTEXT, "float32")
    for positions in (np.full(32, 84), np.full(8, 139), np.array([300]), np.array([5, 300])):
        cache = SlotKVCache(cfg.num_layers, 32, cfg.num_kv_heads, cfg.head_dim, MAX_CONTEXT, "float32")
        cache.ensure(int(positions.max()) + 1, len(positions))
        groups, order = dec.attention.decode_groups(cache, positions.astype(np.int64))
        assert len(groups) == 1, positions
        assert groups[0].blocks is None
        assert groups[0].rows is None
        assert order is None
