"""Model files are untrusted input: each hostile file here is made by the test, and each must fail at load with a
clear error naming what is wrong (or, for chat templates, fail its render within bounded work), running nothing.

- pickled `.pdparams` are refused unless trusted (a pickle that would create a marker file proves nothing ran);
- a hub id is fetched only with the `hf:` prefix;
- crafted GGUF metadata and shapes are refused by field name before any tensor is dequantized;
- the float32 cache of one GGUF never deletes another's, and a replaced file never reuses a stale cache;
- chat templates compile at load, support what transformers' environment does, and render within limits.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from service.config import load_config
from service.engine.api import ChatTemplateError
from service.engine.checkpoints import gguf as gguf_reader
from service.engine.checkpoints.loader import (
    CheckpointNotFoundError,
    PickleRefusedError,
    load_model,
    resolve_model,
)
from service.engine.checkpoints.model_config import UnsupportedModelError
from service.engine.tokenizer import MAX_RENDER_STEPS, Tokenizer
from tests.checkpoints import write_tokenizer
from tests.gguf_files import tiny_llama, tiny_vocab

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "x"}]
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 128}


class _Touch:
    """Unpickling this creates `marker`: the proof, when the marker is absent, that no pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def hostile_pdparams_dir(root: Path) -> tuple[Path, Path]:
    model = root / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    write_tokenizer(model)
    marker = root / "pickle-ran"
    (model / "model_state.pdparams").write_bytes(pickle.dumps({"model.embed_tokens.weight": _Touch(marker)}))
    return model, marker


# -- pickles and the hub -----------------------------------------------------------------------------------


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    model, marker = hostile_pdparams_dir(tmp_path)
    with pytest.raises(PickleRefusedError, match=r"model_state\.pdparams.*runs any code.*--trust-pickle"):
        load_model(model)
    assert not marker.exists()
    # The control: trusted, the same file does run its code, so the refusal above is what kept it from running.
    with pytest.raises(Exception):  # noqa: B017, PT011 -- whatever the loader makes of a weight that is not one
        load_model(model, trust_pickle=True)
    assert marker.exists()


def test_trust_pickle_is_a_setting_off_by_default() -> None:
    assert load_config([], env={}).trust_pickle is False
    assert load_config(["--trust-pickle", "true"], env={}).trust_pickle is True
    assert load_config([], env={"TOKENSTREAM_TRUST_PICKLE": "1"}).trust_pickle is True


def test_hub_is_reached_only_with_the_hf_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointNotFoundError, match=r"does not exist \(to fetch it .* write hf:some-org/model\)"):
        resolve_model("some-org/model", allow_network=True)  # a look-alike of a hub id is only ever a local path
    assert calls == []
    assert resolve_model("hf:some-org/model", allow_network=True) == tmp_path
    assert calls[-1]["repo_id"] == "some-org/model" and "*.pdparams" not in calls[-1]["allow_patterns"]
    resolve_model("hf:some-org/model", allow_network=True, trust_pickle=True)
    assert "*.pdparams" in calls[-1]["allow_patterns"]
    with pytest.raises(CheckpointNotFoundError, match="networking is off"):
        resolve_model("hf:some-org/model", allow_network=False)
    assert len(calls) == 2


# -- crafted GGUF metadata ---------------------------------------------------------------------------------


@pytest.fixture
def no_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each hostile file must be refused on its header alone: dequantizing anything fails the test."""

    def refuse(tensor: Any) -> np.ndarray:
        raise AssertionError(f"{tensor.name} was dequantized before the file was refused")

    monkeypatch.setattr(gguf_reader, "dequantize", refuse)


def _long_token_types() -> Any:
    vocab = tiny_vocab()
    vocab.types = vocab.types + [1] * 5
    return vocab


def _out_of_range_bos() -> Any:
    vocab = tiny_vocab()
    vocab.bos = 10**6
    return vocab


HOSTILE_GGUF: dict[str, tuple[dict[str, Any], str]] = {
    "zero-heads": ({"hparams": {"heads": 0}}, r"llama\.attention\.head_count: 0 is not a positive integer"),
    "zero-kv-heads": ({"hparams": {"kv_heads": 0}}, r"llama\.attention\.head_count_kv: 0 is not a positive integer"),
    "kv-not-dividing": ({"hparams": {"kv_heads": 3}}, r"head_count_kv: 3 does not divide .*head_count \(2\)"),
    "rows-not-divisible-by-heads": ({"hparams": {"heads": 3, "rope_dim": 84}},
                                    r"llama\.embedding_length: 256 is not a multiple of .*head_count \(3\)"),
    "heads-against-the-tensors": ({"hparams": {"heads": 4}},
                                  r"tensor blk\.0\.attn_k\.weight has shape \[128, 256\].*gives \[64, 256\]"),
    "ffn-against-the-tensors": ({"hparams": {"ffn": 10**6}}, r"tensor blk\.0\.ffn_\w+\.weight has shape"),
    "huge-block-count": ({"hparams": {"layers": 10**9}}, r"llama\.block_count: 1000000000 layers need 9 tensors"),
    "zero-context": ({"hparams": {"context_length": 0}}, r"llama\.context_length: 0 is not a positive integer"),
    "negative-eps": ({"hparams": {"eps": -1.0}},
                     r"llama\.attention\.layer_norm_rms_epsilon: -1\.0 is not a positive finite number"),
    "token-type-longer-than-tokens": ({"vocab": _long_token_types()},
                                      r"tokenizer\.ggml\.token_type has 269 entries, but tokenizer\.ggml\.tokens has "
                                      r"264"),
    "bos-outside-the-vocabulary": ({"vocab": _out_of_range_bos()},
                                   r"tokenizer\.ggml\.bos_token_id: 1000000 is outside the vocabulary"),
    "string-where-a-count-goes": ({"extra": {"llama.expert_count": "many"}},
                                  r"llama\.expert_count: 'many' is not a non-negative integer"),
}


@pytest.mark.parametrize("case", list(HOSTILE_GGUF))
def test_crafted_gguf_metadata_is_refused_by_field(case: str, tmp_path: Path, no_dequantize: None) -> None:
    kwargs, message = HOSTILE_GGUF[case]
    path = tiny_llama(tmp_path / "m.gguf", **kwargs)
    with pytest.raises(gguf_reader.GGUFError, match=message):
        load_model(path)


def test_unpermute_refuses_rows_that_do_not_split_into_heads() -> None:
    with pytest.raises(gguf_reader.GGUFError, match="do not split into 3 heads"):
        gguf_reader.unpermute_rows(np.zeros((8, 4), np.float32), 3)


# -- the float32 cache -------------------------------------------------------------------------------------


def test_caches_of_similar_names_do_not_delete_each_other(tmp_path: Path) -> None:
    a = tiny_llama(tmp_path / "a.gguf")
    ax = tiny_llama(tmp_path / "a.gguf.x.gguf", seed=1)
    gguf_reader.read_gguf(a)
    gguf_reader.read_gguf(ax)
    (ax_cache,) = gguf_reader.own_caches(tmp_path, ax)
    tiny_llama(a, seed=2)  # a new a.gguf: its own old cache goes when the new one is written
    assert not gguf_reader.read_gguf(a).from_cache
    assert len(gguf_reader.own_caches(tmp_path, a)) == 1
    assert ax_cache.exists()
    assert gguf_reader.read_gguf(ax).from_cache


def test_replaced_file_with_same_size_and_mtime_reads_the_new_weights(tmp_path: Path) -> None:
    path = tiny_llama(tmp_path / "m.gguf")
    old = gguf_reader.read_gguf(path)
    stat = path.stat()
    new = tiny_llama(tmp_path / "new.gguf", seed=1)
    assert new.stat().st_size == stat.st_size
    os.utime(new, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(new, path)
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    again = gguf_reader.read_gguf(path)
    assert not again.from_cache
    weight = "model.layers.0.self_attn.v_proj.weight"
    assert not np.array_equal(again.state[weight], old.state[weight])
    assert gguf_reader.read_gguf(path).from_cache


# -- chat templates ----------------------------------------------------------------------------------------


def _tokenizer(template: Any) -> Tokenizer:
    tok = HFTokenizer(models.WordLevel({"<unk>": 0, "hi": 1, "yo": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(tok, {"chat_template": template, "eos_token": "</s>"})


def test_template_that_does_not_compile_fails_the_load(tmp_path: Path) -> None:
    with pytest.raises(ChatTemplateError, match=r"does not compile: line 1"):
        _tokenizer("{% for m in messages %}{{ m.content }}")
    vocab = tiny_vocab()
    vocab.chat_template = "{% if messages %}{{ messages[0].content }"
    with pytest.raises(UnsupportedModelError, match=r"m\.gguf: chat template does not compile"):
        load_model(tiny_llama(tmp_path / "m.gguf", vocab=vocab))
    model = tmp_path / "hf"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    write_tokenizer(model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% endfor %}"}))
    with pytest.raises(UnsupportedModelError, match=r"hf: chat template does not compile"):
        load_model(model)  # fails on the template, before any weights are looked for


def test_loop_controls_and_generation_blocks_render_as_in_transformers() -> None:
    tok = _tokenizer("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                     "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}"
                     "{% continue %}{% endif %}{{ m.content }}{% endfor %}{{ messages | tojson }}")
    assert tok.render_chat(CHAT) == "hi[yo]" + json.dumps(CHAT)


def test_list_form_chat_template_uses_its_default() -> None:
    tok = _tokenizer([{"name": "tool_use", "template": "tools"},
                      {"name": "default", "template": "D{{ messages[0].content }}"}])
    assert tok.chat_template == "D{{ messages[0].content }}"
    assert tok.render_chat(CHAT) == "Dhi"
    with pytest.raises(ChatTemplateError, match="none is named 'default'"):
        _tokenizer([{"name": "a", "template": "A"}, {"name": "b", "template": "B"}])


def test_chat_template_jinja_file_wins_over_the_config(tmp_path: Path) -> None:
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config"}))
    (tmp_path / "chat_template.jinja").write_text("file {{ messages[0].content }}")
    assert Tokenizer.from_dir(tmp_path).render_chat(CHAT) == "file hi"


@pytest.mark.parametrize(("template", "message"), [
    ("{{ 'x' * 10**7 }}", r"would build a repeated string or list of 10000000"),
    ("{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}",
     rf"exceeded {MAX_RENDER_STEPS} loop iterations"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     r"would build a concatenated string"),
    ("{{ 'x'.ljust(10**9) }}", r"passes 1000000000 to ljust"),
    ("{{ ('x' * 1000000) | list | join('y' * 1000000) }}", r"would build a joined string"),
    ("{{ '%999999999s' % 'x' }}", r"formats with width 999999999"),
    ("{{ 10 ** 10 ** 10 }}", r"computes an integer of about"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", r"exceeds 2097152 characters|characters of work"),
    ("{% macro f() %}{{ f() }}{{ f() }}{% endmacro %}{{ f() }}", r"recursion|loop iterations and calls"),
])
def test_template_resource_use_is_bounded(template: str, message: str) -> None:
    tok = _tokenizer(template)  # each compiles: the limit is met when it renders, with a clear error
    with pytest.raises(ChatTemplateError, match=message):
        tok.render_chat(CHAT)


def test_the_server_refuses_a_pickle_checkpoint_unless_trusted(tmp_path: Path) -> None:
    """End to end: the server's load refuses the tests' own (valid) .pdparams checkpoint, and serves it only with
    --trust-pickle (Config.trust_pickle reaches the loader)."""
    from tests.checkpoints import SPECS, TinyModel
    from tests.support.servers import ServerThread, base_config
    from tokenstream.v1 import generation_pb2 as pb
    from tokenstream.v1 import generation_pb2_grpc as pb_grpc

    model_dir = TinyModel.build(SPECS["llama"], tmp_path).save("paddle-pdparams")
    refused = ServerThread(base_config(model_dir))
    try:
        with pytest.raises(PickleRefusedError, match="--trust-pickle"):
            refused.wait_ready()
    finally:
        refused.close()
    trusted = ServerThread(base_config(model_dir, trust_pickle=True))
    try:
        trusted.wait_ready()
        with trusted.channel() as ch:
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(
                prompt="hi", stopping=pb.StoppingCriteria(max_new_tokens=3)), timeout=60))
        assert sum(len(m.tokens) for m in msgs) == 3
    finally:
        trusted.close()
