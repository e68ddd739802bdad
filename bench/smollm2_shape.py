"""A random-weight checkpoint with SmolLM2-135M's exact shapes, for timing the decoder on the real model shape.

Timing does not depend on weight values, so the profile runs on this instead of the GGUF file (whose loader lives
on another branch). Llama: 30 layers, hidden 576, 9 heads / 3 KV heads (head_dim 64), intermediate 1536, vocab
49,152, tied embeddings, rope_theta 100000. Fan-in init as service/engine/default_model.py does, so activations
stay in a realistic range. The tokenizer is a word-level one with exactly 49,152 entries: the decoder never
looks at it, the loader only needs one that exists.

    python -m bench.smollm2_shape   # builds ~/.cache/tokenstream/profile-models/smollm2-135m-shape (540 MB, ~20 s)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

NAME = "smollm2-135m-shape"
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}
VERSION = 1  # bump when the weights' recipe changes


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenstream" / "profile-models"


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    c = CONFIG
    rng = np.random.default_rng(seed)
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp), dtype=np.float32) / np.float32(np.sqrt(inp))).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    state = {"model.embed_tokens.weight": lin(v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        state[p + "input_layernorm.weight"] = norm()
        state[p + "self_attn.q_proj.weight"] = lin(q, h)
        state[p + "self_attn.k_proj.weight"] = lin(kv, h)
        state[p + "self_attn.v_proj.weight"] = lin(kv, h)
        state[p + "self_attn.o_proj.weight"] = lin(h, q)
        state[p + "post_attention_layernorm.weight"] = norm()
        state[p + "mlp.gate_proj.weight"] = lin(i, h)
        state[p + "mlp.up_proj.weight"] = lin(i, h)
        state[p + "mlp.down_proj.weight"] = lin(h, i)
    state["model.norm.weight"] = norm()
    return state


def _tokenizer() -> dict:
    vocab = {f"t{i}": i for i in range(CONFIG["vocab_size"])}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
    }


def ensure(root: Path | None = None) -> Path:
    """The checkpoint's directory, built on first use."""
    from safetensors.numpy import save_file

    target = (root or cache_root()) / NAME
    stamp = target / "VERSION"
    if stamp.exists() and stamp.read_text().strip() == str(VERSION):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(CONFIG, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(_tokenizer()))
        save_file(_state(), str(tmp / "model.safetensors"))
        (tmp / "VERSION").write_text(str(VERSION))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


if __name__ == "__main__":
    print(ensure())
