"""Loading every supported architecture in every checkpoint layout, checked against independent references.

Tiny random checkpoints (tests/checkpoints.py) are written by PaddleFormers (Llama) and transformers on PyTorch
CPU (Llama 3 RoPE scaling, Qwen2, Mistral, ERNIE-4.5) themselves. For each, our decoder's logits (a 10-token
prompt prefilled at slot 0 in two chunks and at slot 1 in one, then 3 batched decode steps) must match the
reference library's full forward within 1e-4 in float32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.engine.checkpoints.loader import (
    CheckpointNotFoundError,
    _read_checkpoint,
    build_weights,
    load_model,
    resolve_model,
)
from service.engine.checkpoints.model_config import ModelConfig, UnsupportedModelError
from tests.checkpoints import GENERATION_CONFIG, SPECS, VOCAB, TinyModel
from tests.reference import DECODE, MAX_CONTEXT, PROMPT, max_diff

TOL = 1e-4

CASES = [(name, layout) for name, spec in SPECS.items() for layout in spec.layouts]
MEASURED: dict[str, float] = {}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], TinyModel]:
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in built:
            built[name] = TinyModel.build(SPECS[name], root)
        return built[name]

    return get


def token_ids(seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(4, VOCAB, PROMPT + DECODE)]


@pytest.mark.parametrize(("arch", "layout"), CASES, ids=[f"{a}-{lay}" for a, lay in CASES])
def test_logits_match_reference(tiny: Callable[[str], TinyModel], arch: str, layout: str) -> None:
    t = tiny(arch)
    ids = token_ids(t.spec.seed)
    ref = t.reference_logits(ids, bf16=layout == "hf-bf16")
    assert np.abs(ref).max() > 1.0, "reference logits too flat to tell a wrong model apart"
    model = load_model(t.save(layout), trust_pickle=True)  # the tests' own files, .pdparams pickles among them
    assert model.config.vocab_size == VOCAB
    diff = max_diff(model, ref, ids)
    MEASURED[f"{arch}/{layout}"] = diff
    print(f"\n{arch:15s} {layout:20s} max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_layout_written_as_claimed(tiny: Callable[[str], TinyModel]) -> None:
    """The builders really produce the files, metadata and key names each layout stands for."""
    llama = tiny("llama")
    files = {lay: sorted(p.name for p in llama.save(lay).iterdir()) for lay in SPECS["llama"].layouts}
    assert "model.safetensors" in files["hf"]
    assert "model.safetensors.index.json" in files["hf-sharded"]
    assert sum(n.startswith("model-0000") for n in files["hf-sharded"]) > 1
    assert "model_state.pdparams" in files["paddle-pdparams"]
    assert _read_checkpoint(llama.save("paddle-safetensors")).paddle_signal is True
    assert _read_checkpoint(llama.save("hf")).paddle_signal is False
    ernie = _read_checkpoint(tiny("ernie").save("paddle-pdparams"), trust_pickle=True).state
    assert "model.layers.0.self_attn.qkv_proj.weight" in ernie  # PaddleFormers' fused, grouped q/k/v
    assert "model.layers.0.mlp.up_gate_proj.weight" in ernie


def test_paddle_safetensors_recognized_by_metadata_alone(tiny: Callable[[str], TinyModel], tmp_path: Path) -> None:
    """Every Llama projection is square here: without `"source": "paddle"` only the safetensors metadata tells."""
    t = tiny("llama")
    src = t.save("paddle-safetensors")
    dst = tmp_path / "llama-paddle-meta-only"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.pop("source", None)
    (dst / "config.json").write_text(json.dumps(config))
    ids = token_ids(t.spec.seed)
    assert max_diff(load_model(dst), t.reference_logits(ids), ids) < TOL


def test_paddlenlp_legacy_llama_prefix_and_lm_head(tiny: Callable[[str], TinyModel], tmp_path: Path) -> None:
    """Older PaddleNLP Llama checkpoints: `llama.` instead of `model.` and lm_head stored [hidden, vocab]."""
    import paddle

    t = tiny("llama")
    dst = tmp_path / "llama-paddlenlp"
    shutil.copytree(t.save("paddle-pdparams"), dst)
    state = paddle.load(str(dst / "model_state.pdparams"))
    legacy = {("llama." + k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    legacy["lm_head.weight"] = legacy["lm_head.weight"].t().contiguous()
    paddle.save(legacy, str(dst / "model_state.pdparams"))
    ids = token_ids(t.spec.seed)
    assert max_diff(load_model(dst, trust_pickle=True), t.reference_logits(ids), ids) < TOL


def test_negative_controls(tiny: Callable[[str], TinyModel]) -> None:
    """The comparisons can fail: ERNIE without its q/k permutation, Llama 3 without its RoPE scaling are far off."""
    t = tiny("ernie")
    ids = token_ids(t.spec.seed)
    model = load_model(t.save("hf"))
    plain_cfg = dataclasses.replace(model.config, rope_interleaved=False)
    wrong = build_weights(plain_cfg, _read_checkpoint(model.path).state, "float32")
    assert max_diff(model, t.reference_logits(ids), ids, weights=wrong) > 1e-2
    t = tiny("llama3")
    ids = token_ids(t.spec.seed)
    model = load_model(t.save("hf"))
    unscaled = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_scaling=None))
    assert max_diff(unscaled, t.reference_logits(ids), ids) > 1e-2


def test_bfloat16_compute_where_the_device_has_it(tiny: Callable[[str], TinyModel]) -> None:
    """bfloat16 weights computed in bfloat16 where Paddle has the kernels; a clear refusal where it has not (CPU)."""
    import paddle

    t = tiny("qwen2")
    path = t.save("hf-bf16")
    probe = paddle.ones([2, 2], dtype="bfloat16")
    try:
        paddle.matmul(probe, probe)
    except RuntimeError:
        with pytest.raises(ValueError, match=r"bfloat16.*not supported on device"):
            load_model(path, dtype="bfloat16")
        return
    ids = token_ids(t.spec.seed)
    model = load_model(path, dtype="bfloat16")
    diff = max_diff(model, t.reference_logits(ids, bf16=True), ids, dtype="bfloat16")
    print(f"\nqwen2 hf-bf16 computed in bfloat16: max |logit diff| = {diff:.2e}")
    assert diff < 0.25


def test_engine_greedy_matches_reference(tiny: Callable[[str], TinyModel]) -> None:
    """End to end through the Engine: ERNIE (head_dim != hidden/heads, interleaved RoPE) from PaddleFormers' save."""
    from service.engine.api import EngineConfig
    from service.engine.scheduler import Engine
    from service.engine.types import GenerationRequest

    t = tiny("ernie")
    model = load_model(t.save("paddle-pdparams"), trust_pickle=True)
    prompt = token_ids(t.spec.seed)[:PROMPT]
    want, ids = [], list(prompt)
    for _ in range(5):
        tok = int(np.argmax(t.reference_logits(ids)[-1]))
        want.append(tok)
        if tok in model.config.eos_token_ids:
            break
        ids.append(tok)
    engine = Engine(model, EngineConfig(max_slots=2, max_context=MAX_CONTEXT))
    engine.start(warmup=False)
    try:
        got = [tok.id for chunk in engine.generate_sync(GenerationRequest(prompt, 5)) for tok in chunk.tokens]
    finally:
        engine.stop()
    assert got == want


def test_generation_config_and_tied_embeddings(tiny: Callable[[str], TinyModel]) -> None:
    model = load_model(tiny("qwen2").save("hf-sharded"))
    assert model.config.eos_token_ids == tuple(GENERATION_CONFIG["eos_token_id"])
    assert model.generation_defaults["temperature"] == 0.7
    assert model.generation_defaults["top_p"] == 0.9
    assert model.config.tie_word_embeddings is True and model.config.attention_bias is True
    assert model.tokenizer.encode("w5 w17") == [5, 17]


def test_transformers5_rope_parameters_are_read(tiny: Callable[[str], TinyModel]) -> None:
    """transformers 5 writes only `rope_parameters` (no rope_theta / rope_scaling): both must be picked up."""
    llama3 = load_model(tiny("llama3").save("hf")).config
    assert llama3.rope_theta == 500000.0
    assert llama3.rope_scaling is not None and llama3.rope_scaling["rope_type"] == "llama3"
    ernie = load_model(tiny("ernie").save("erniekit")).config  # ERNIEKit: top-level rope_theta, alias name
    assert (ernie.architecture, ernie.rope_theta, ernie.rope_interleaved) == ("Ernie4_5ForCausalLM", 500000.0, True)
    assert ernie.head_dim == 16 != ernie.hidden_size // ernie.num_heads


def test_sliding_window_caps_the_context(tiny: Callable[[str], TinyModel]) -> None:
    windowed = load_model(tiny("mistral-window").save("hf")).config
    assert windowed.sliding_window == 16 and windowed.max_position_embeddings == 16
    full = load_model(tiny("mistral").save("hf")).config
    assert full.sliding_window is None and full.max_position_embeddings == 128


def _raw(**changes: object) -> dict:
    raw: dict = {"architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": 32,
                 "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    raw.update(changes)
    return raw


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"architectures": ["Ernie4_5_MoeForCausalLM"]}, "Ernie4_5_MoeForCausalLM"),
        ({"architectures": ["Ernie4_5ForCausalLM"], "use_bias": True}, "use_bias"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
        ({"hidden_act": "gelu"}, "gelu"),
    ],
)
def test_unsupported_configs_are_refused_by_name(changes: dict, needle: str) -> None:
    with pytest.raises(UnsupportedModelError, match=needle):
        ModelConfig.from_dict(_raw(**changes))


def test_unsupported_architecture_checkpoint_fails_naming_it(tiny: Callable[[str], TinyModel], tmp_path: Path) -> None:
    dst = tmp_path / "gpt2"
    shutil.copytree(tiny("mistral").save("hf"), dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(dst)


def test_hub_name_offline_says_how_to_provide_a_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_model("hf:some-org/some-model", allow_network=False)
    message = str(info.value)
    assert "hf:some-org/some-model" in message and "HF_HUB_OFFLINE" in message and "--model-dir" in message
    with pytest.raises(CheckpointNotFoundError, match="HF_HUB_OFFLINE"):
        load_model("hf:some-org/some-model")  # networking follows the environment by default
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        resolve_model("/nonexistent/model/dir", allow_network=True)  # a path is never looked up on the hub


def test_local_directory_is_used_as_is(tiny: Callable[[str], TinyModel]) -> None:
    d = tiny("mistral").save("hf")
    assert resolve_model(str(d), allow_network=False) == d
