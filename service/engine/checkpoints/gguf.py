"""GGUF checkpoints (llama.cpp's single-file format): weights, config, tokenizer and chat template from one file.

Every tensor is dequantized to float32 with the `gguf` package (llama.cpp's own Python library) and renamed to the
Hugging Face names that `loader.build_weights` consumes; the config is the config.json a Hugging Face checkpoint of
the same model would carry. llama.cpp's converter permutes the rows of attn_q / attn_k of `llama` models for its
interleaved RoPE; they are permuted back here, so the decoder's rotate-half RoPE applies (`qwen2` is stored unpermuted).

A GGUF file is untrusted input: every metadata field and every tensor's type, shape and extent is checked against
the others and against the file size before anything is dequantized, and each failure is a GGUFError naming the
field or tensor.

Dequantizing takes seconds, so the result (weights, config, tokenizer) is cached as float32 safetensors next to the
GGUF file (or in the user cache when that directory is read-only), keyed by a sha256 of the file's contents, so that
a file replaced by another (whatever its size and mtime) never reuses the old cache. The hash is computed once: the
cache records the file's identity (device, inode, size, mtime and ctime, which no one can set by hand), and a later
start that finds the same identity reads the cache without hashing the file again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import math
import os
import re
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from service.engine.checkpoints.model_config import UnsupportedModelError
from service.engine.progress import Progress

log = logging.getLogger("tokenstream.gguf")

# general.architecture -> the Hugging Face architecture the decoder runs it as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Pre-tokenizer regexes by tokenizer.ggml.pre, as llama.cpp's llama-vocab.cpp and the models' own tokenizer.json
# define them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    regexes: tuple[str, ...]  # applied in turn, each isolating its matches; byte-level mapping follows
    ignore_merges: bool = False  # a word that is itself in the vocabulary is one token (Llama 3)
    nfc: bool = False  # Qwen2's tokenizer.json normalizes to NFC first
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_REGEX,), nfc=True)
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "smollm": PreTokenizer((r"\p{N}", GPT2_REGEX)),  # digits one by one, then GPT-2's regex
    "gpt-2": PreTokenizer((GPT2_REGEX,)),
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _QWEN2,
    "deepseek-r1-qwen": _QWEN2,
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4

CACHE_VERSION = "2"  # bump when the cached tensors or metadata would differ for the same GGUF file
CACHE_SUFFIX = ".f32.safetensors"


class GGUFError(UnsupportedModelError):
    """The GGUF file is unreadable, or holds a model or tokenizer the engine cannot run."""


@dataclass
class GGUFCheckpoint:
    config: dict[str, Any]  # as a Hugging Face config.json
    state: dict[str, np.ndarray]  # Hugging Face names, float32, Linear weights [out, in]
    tokenizer: HFTokenizer
    tokenizer_config: dict[str, Any]  # as a tokenizer_config.json: chat_template, bos_token, eos_token
    generation: dict[str, Any]  # as a generation_config.json: bos / eos ids
    add_bos: bool
    from_cache: bool = False


# -- metadata ----------------------------------------------------------------------------------------------


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct or numpy errors alike
        raise GGUFError(f"{path} is not a readable GGUF file (truncated or corrupt?): {exc}") from exc


def _metadata(path: Path, reader: Any) -> dict[str, Any]:
    meta = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = fld.contents()
        except Exception as exc:  # e.g. a string that is not UTF-8
            raise GGUFError(f"{path}: GGUF metadata {key} is unreadable: {exc}") from exc
    return meta


def _check_complete(path: Path, reader: Any) -> None:
    """Every tensor lies inside the file, apart from the others, in whole blocks of its type: then the float32
    weights are bounded by the file size (at most ~20x, for the 1.5-bit types) before one is dequantized."""
    from gguf import GGML_QUANT_SIZES

    size = path.stat().st_size
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(f"{path} is truncated: tensor {t.name} needs bytes up to {end}, the file has {size}")
        block, _ = GGML_QUANT_SIZES.get(t.tensor_type, (1, 0))
        row = int(t.shape[0]) if len(t.shape) else 0
        if row <= 0 or row % block or any(int(n) <= 0 for n in t.shape):
            raise GGUFError(f"{path}: tensor {t.name} has shape {[int(n) for n in t.shape]} (GGUF order), which is "
                            f"not whole blocks of {block} values of its type {t.tensor_type.name}")
    previous = None
    for t in sorted(reader.tensors, key=lambda t: int(t.data_offset)):
        if previous is not None and int(t.data_offset) < int(previous.data_offset) + int(previous.n_bytes):
            raise GGUFError(f"{path}: tensors {previous.name} and {t.name} overlap in the file")
        previous = t


def _count(path: Path, key: str, value: Any, minimum: int = 1) -> int:
    """An integer metadata value, at least `minimum` (1 or 0)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise GGUFError(f"{path}: GGUF metadata {key}: {value!r} is not a {kind} integer")
    return value


def _positive(path: Path, key: str, value: Any) -> float:
    """A positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise GGUFError(f"{path}: GGUF metadata {key}: {value!r} is not a positive finite number")
    return float(value)


def _string(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise GGUFError(f"{path}: GGUF metadata {key}: {value!r} is not a string")
    return value


def _list_of(path: Path, key: str, value: Any, kind: type) -> list[Any]:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise GGUFError(f"{path}: GGUF metadata {key} is not a list of {kind.__name__} values")
    return value


LAYER_TENSORS = 9  # weights per layer: two norms, q, k, v, o, gate, up, down


def gguf_config(path: Path, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The Hugging Face config.json equivalent of the metadata; `shapes` are numpy shapes by GGUF tensor name.

    Every value is checked here, by name, so that nothing later divides by zero or reshapes by a wrong count.
    """
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    split = _count(path, "split.count", meta.get("split.count", 1))
    if split > 1:
        raise GGUFError(f"{path} is one part of a split GGUF ({split} parts); merge it first with "
                        "`llama-gguf-split --merge`")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{path}: GGUF metadata {arch}.{key} is missing")
        if isinstance(value, list):  # per-layer values: the decoder needs every layer alike
            if not value or len(set(map(repr, value))) != 1:
                raise GGUFError(f"{path}: GGUF metadata {arch}.{key} differs between layers ({value[:8]}); "
                                "the decoder needs every layer alike")
            value = value[0]
        return value

    def count(key: str, default: Any = None, minimum: int = 1) -> int:
        return _count(path, f"{arch}.{key}", get(key, default), minimum)

    def positive(key: str, default: Any = None) -> float:
        return _positive(path, f"{arch}.{key}", get(key, default))

    if experts := count("expert_count", 0, minimum=0):
        raise GGUFError(f"{path}: {arch} with {experts} experts (mixture of experts) is not supported")
    hidden = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    if heads % kv_heads:
        raise GGUFError(f"{path}: GGUF metadata {arch}.attention.head_count_kv: {kv_heads} does not divide "
                        f"{arch}.attention.head_count ({heads})")
    if f"{arch}.attention.key_length" not in meta and hidden % heads:
        raise GGUFError(f"{path}: GGUF metadata {arch}.embedding_length: {hidden} is not a multiple of "
                        f"{arch}.attention.head_count ({heads}), and there is no {arch}.attention.key_length")
    head_dim = count("attention.key_length", hidden // heads)
    if head_dim % 2:
        raise GGUFError(f"{path}: GGUF metadata {arch}.attention.key_length: head size {head_dim} is odd; RoPE "
                        "rotates pairs of dimensions")
    if count("attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{path}: key and value head sizes differ, which the decoder does not support")
    rope_dim = count("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{path}: RoPE on {rope_dim} of {head_dim} head dimensions (partial rotary) is not supported")
    if "rope_freqs.weight" in shapes:
        raise GGUFError(f"{path}: rope_freqs.weight (per-dimension RoPE frequency factors, as Llama 3.1 uses) is "
                        "not supported")
    scaling_type = _string(path, f"{arch}.rope.scaling.type", get("rope.scaling.type", "none"))
    scaling: dict[str, Any] | None = None
    if scaling_type == "linear":
        scaling = {"rope_type": "linear", "factor": positive("rope.scaling.factor")}
    elif scaling_type != "none":
        raise GGUFError(f"{path}: RoPE scaling {scaling_type!r} is not supported; supported: none, linear")
    layers = count("block_count")
    if layers * LAYER_TENSORS > len(shapes):  # checked before anything is built per layer
        raise GGUFError(f"{path}: GGUF metadata {arch}.block_count: {layers} layers need {LAYER_TENSORS} tensors "
                        f"each, and the file has {len(shapes)} tensors in all")
    embed = shapes.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{path} has no token_embd.weight")
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(embed[0]),
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": count("context_length"),
        "rms_norm_eps": positive("attention.layer_norm_rms_epsilon"),
        "rope_theta": positive("rope.freq_base", 10000.0),
        "rope_scaling": scaling,
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in shapes,
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            cfg[key] = _count(path, f"tokenizer.ggml.{key}", value, minimum=0)
    return cfg


def expected_shapes(arch: str, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The numpy shape of every tensor a model of this config has, by GGUF name (output.weight when untied)."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["output.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (h,), b + "ffn_norm.weight": (h,), b + "attn_q.weight": (q, h),
                   b + "attn_k.weight": (kv, h), b + "attn_v.weight": (kv, h), b + "attn_output.weight": (h, q),
                   b + "ffn_gate.weight": (f, h), b + "ffn_up.weight": (f, h), b + "ffn_down.weight": (h, f)}
        if arch == "qwen2":  # Qwen2 always has q/k/v biases; Llama has none
            shapes |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
    return shapes


def check_shapes(path: Path, arch: str, cfg: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor is one the model has, in the shape the metadata gives it, and none is missing: checked on the
    header alone, before a byte is dequantized."""
    unknown = [name for name in shapes if hf_name(name) is None]
    if unknown:
        shown = ", ".join(unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        raise GGUFError(f"{path}: {arch} tensors the decoder has no place for: {shown}")
    want = expected_shapes(arch, cfg)
    for name, shape in shapes.items():
        if name not in want:
            raise GGUFError(f"{path}: tensor {name} has no place in a {arch} model of "
                            f"{cfg['num_hidden_layers']} layers ({arch}.block_count)")
        if tuple(shape) != want[name]:
            raise GGUFError(f"{path}: tensor {name} has shape {list(shape)}, but the metadata ({arch}.*) gives "
                            f"{list(want[name])}")
    missing = [name for name in want if name not in shapes]
    if missing:
        raise GGUFError(f"{path} lacks tensor {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1
                                                               else ""))


# -- tensors -----------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the decoder has no place for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_TENSOR.match(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows: per head, interleaved (x0, x_{d/2}, x1, ...) back to halves."""
    if heads <= 0 or w.shape[0] % heads or (w.shape[0] // heads) % 2:
        raise GGUFError(f"{w.shape[0]} rows do not split into {heads} heads of an even size")
    d = w.shape[0] // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Tensor types dequantized here, each checked against llama.cpp's own dequantization (tests/test_gguf.py):
# floats, the legacy and K-quants, and the i-quants, ternary and FP4 types that the gguf package implements.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0",
    "MXFP4", "NVFP4",
)


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (the reverse of GGUF's ne order)."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise GGUFError(f"tensor {tensor.name} has type {kind}, which is not supported; supported: "
                        f"{', '.join(SUPPORTED_TYPES)}")
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
    out = quants.dequantize(tensor.data, tensor.tensor_type)
    # F32 tensors come back as read-only views of the memory-mapped file: own them, writable and contiguous.
    return np.require(out, np.float32, ["C", "W", "O"]).reshape(shape)


def read_tensors(path: Path, reader: Any, arch: str, cfg: dict[str, Any],
                 progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Every tensor dequantized, under its Hugging Face name, q/k rows of `llama` back in Hugging Face order."""
    state: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        assert name is not None
        w = dequantize(t)
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_rows(w, cfg["num_attention_heads"])
        elif arch == "llama" and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_rows(w, cfg["num_key_value_heads"])
        if not np.isfinite(w).all():
            raise GGUFError(f"{path}: tensor {t.name} ({t.tensor_type.name}) has non-finite values")
        state[name] = w
        if progress is not None:
            progress.update(int(t.n_elements))
    return state


# -- tokenizer ---------------------------------------------------------------------------------------------


def gguf_tokenizer(path: Path, meta: dict[str, Any]) -> tuple[HFTokenizer, dict[str, Any], dict[str, Any], bool]:
    """(tokenizer, tokenizer_config, generation defaults, add_bos) from the tokenizer.ggml.* metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model is not None:
        _string(path, "tokenizer.ggml.model", model)
    if model == "llama":
        raise GGUFError(f"{path}: SentencePiece vocabularies (tokenizer.ggml.model 'llama') are not supported; "
                        "only byte-level BPE ('gpt2') is")
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE ('gpt2') is")
    pre_name = meta.get("tokenizer.ggml.pre")
    pre = PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
    if pre is None:
        raise GGUFError(f"{path}: pre-tokenizer {pre_name!r} (tokenizer.ggml.pre) is not supported; supported: "
                        f"{', '.join(PRE_TOKENIZERS)}")
    if meta.get("tokenizer.ggml.add_eos_token"):
        raise GGUFError(f"{path}: tokenizer.ggml.add_eos_token is set; appending EOS to prompts is not supported")
    tokens: list[str] = _list_of(path, "tokenizer.ggml.tokens", meta.get("tokenizer.ggml.tokens") or [], str)
    merges_text: list[str] = _list_of(path, "tokenizer.ggml.merges", meta.get("tokenizer.ggml.merges") or [], str)
    if not tokens or not merges_text:
        raise GGUFError(f"{path} lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = _list_of(path, "tokenizer.ggml.token_type", meta.get("tokenizer.ggml.token_type") or [1] * len(tokens),
                     int)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: GGUF metadata tokenizer.ggml.token_type has {len(types)} entries, but "
                        f"tokenizer.ggml.tokens has {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges = []
    for m in merges_text:
        parts = m.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{path}: merge {m!r} in tokenizer.ggml.merges is not two tokens")
        merges.append((parts[0], parts[1]))
    try:
        bpe = BPE(vocab, merges, ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # a merge of tokens that are not in the vocabulary
        raise GGUFError(f"{path}: GGUF metadata tokenizer.ggml.merges: {exc}") from exc
    tok = HFTokenizer(bpe)
    if pre.nfc:
        tok.normalizer = normalizers.NFC()
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                   use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens are special (matched in prompts, but never made from chat message content); user-defined
    # tokens are matched wherever they appear, as llama.cpp does.
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, t in enumerate(types) if t == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(types) if t == TOKEN_USER_DEFINED])

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if _count(path, f"tokenizer.ggml.{key}", value, minimum=0) >= len(tokens):
            raise GGUFError(f"{path}: GGUF metadata tokenizer.ggml.{key}: {value} is outside the vocabulary "
                            f"({len(tokens)} tokens)")
        return int(value)

    bos = token_id("bos_token_id")
    eos_ids = [i for i in (token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id"))
               if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos))
    if add_bos and bos is None:
        raise GGUFError(f"{path}: tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id")
    tok_config: dict[str, Any] = {}
    template = meta.get("tokenizer.chat_template")
    if template:  # compiled when the Tokenizer is made, so that one that does not compile fails the load
        tok_config["chat_template"] = _string(path, "tokenizer.chat_template", template)
    if bos is not None:
        tok_config["bos_token"] = tokens[bos]
    if eos_ids:
        tok_config["eos_token"] = tokens[eos_ids[0]]
    generation: dict[str, Any] = {}
    if bos is not None:
        generation["bos_token_id"] = bos
    if eos_ids:
        generation["eos_token_id"] = eos_ids
    return tok, tok_config, generation, add_bos


# -- the whole checkpoint, with its float32 cache ---------------------------------------------------------


def file_identity(path: Path) -> str:
    """What tells this file from a replaced one without reading it: ctime cannot be set by hand, so a file rewritten
    in place and given its old size and mtime back still has another identity."""
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


_HASHES: dict[tuple[str, str], str] = {}  # (path, identity) -> sha256 of the contents, for this process


def content_sha256(path: Path) -> str:
    ident = (str(path.resolve()), file_identity(path))
    if ident not in _HASHES:
        with Progress("hash gguf", unit="bytes", total=path.stat().st_size), path.open("rb") as f:
            _HASHES[ident] = hashlib.file_digest(f, "sha256").hexdigest()
    return _HASHES[ident]


def cache_key(digest: str) -> str:
    """The cache name's key for a file of this content sha256 (and this cache version)."""
    return hashlib.sha256(f"{CACHE_VERSION}\0{digest}".encode()).hexdigest()[:32]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tokenstream" / "gguf"


def _cache_dirs(path: Path, cache_dir: Path | None) -> list[Path]:
    """Where the float32 cache of `path` may be, in order of preference: next to it, then the user cache."""
    return [cache_dir] if cache_dir is not None else [path.parent, default_cache_dir()]


def cache_paths(path: Path, cache_dir: Path | None = None, digest: str | None = None) -> list[Path]:
    """The float32 cache of `path` in each place it may be."""
    name = f"{path.name}.{cache_key(digest or content_sha256(path))}{CACHE_SUFFIX}"
    return [d / name for d in _cache_dirs(path, cache_dir)]


def own_caches(directory: Path, source: Path) -> list[Path]:
    """The caches of `source` in `directory`, and only its own: `<name>.<32 hex>.f32.safetensors`. (A glob
    `<name>.*` alone also matches the caches of `<name>.<x>.gguf`.)"""
    exact = re.compile(re.escape(source.name) + r"\.[0-9a-f]{32}" + re.escape(CACHE_SUFFIX))
    return sorted(p for p in directory.glob(f"{glob.escape(source.name)}.*{CACHE_SUFFIX}") if exact.fullmatch(p.name))


def _cache_metadata(cache: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(cache), framework="np") as handle:
        return dict(handle.metadata() or {})


def _read_cache(cache: Path, digest: str | None = None) -> GGUFCheckpoint | None:
    """The cached checkpoint; None when it is damaged, of another version, or (given `digest`) of other contents."""
    from safetensors.numpy import load_file

    try:
        meta = _cache_metadata(cache)
        if meta.get("tokenstream_gguf_cache") != CACHE_VERSION:
            return None
        if digest is not None and meta.get("source_sha256") != digest:
            return None
        state = load_file(str(cache))
        return GGUFCheckpoint(
            config=json.loads(meta["config"]),
            state=state,
            tokenizer=HFTokenizer.from_str(meta["tokenizer"]),
            tokenizer_config=json.loads(meta["tokenizer_config"]),
            generation=json.loads(meta["generation"]),
            add_bos=meta["add_bos"] == "true",
            from_cache=True,
        )
    except Exception as exc:  # noqa: BLE001 -- any damage (safetensors, JSON, keys) means: rebuild it
        log.warning("ignoring unreadable GGUF cache %s: %s", cache, exc)
        return None


def _write_cache(ckpt: GGUFCheckpoint, candidates: list[Path], source: Path, digest: str | None = None,
                 identity: str | None = None) -> Path | None:
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    meta = {
        "tokenstream_gguf_cache": CACHE_VERSION,
        "source": source.name,
        "source_sha256": digest or content_sha256(source),
        # The identity the file had when it was hashed: a later start that finds it reads this cache unhashed.
        "source_identity": identity or file_identity(source),
        "config": json.dumps(ckpt.config),
        "tokenizer": ckpt.tokenizer.to_str(),
        "tokenizer_config": json.dumps(ckpt.tokenizer_config),
        "generation": json.dumps(ckpt.generation),
        "add_bos": "true" if ckpt.add_bos else "false",
    }
    for cache in candidates:
        # A name of its own per writer; os.replace then publishes the whole file at once, so a concurrent
        # reader sees either no cache or a complete one.
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(ckpt.state, str(tmp), metadata=meta)
            os.chmod(tmp, source.stat().st_mode & 0o666)  # as readable as the model itself
            os.replace(tmp, cache)
        except (OSError, SafetensorError) as exc:  # read-only or full: try the next place
            log.info("could not write the GGUF cache %s: %s", cache, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            continue
        _remove_stale(cache, source)
        return cache
    return None


def _remove_stale(current: Path, source: Path) -> None:
    """Caches of earlier contents of the same file in the same directory (never another file's)."""
    for old in own_caches(current.parent, source):
        if old != current:
            old.unlink(missing_ok=True)


def _cached(path: Path, dirs: list[Path]) -> tuple[GGUFCheckpoint | None, str, str]:
    """(the cached checkpoint or None, the file's sha256, its identity). A cache recorded under the file's current
    identity is read without hashing the file; otherwise the file is hashed and its cache looked up by content."""
    identity = file_identity(path)
    for d in dirs:
        for cache in own_caches(d, path) if d.is_dir() else []:
            with contextlib.suppress(Exception):  # damaged ones are found (and reported) by content below
                meta = _cache_metadata(cache)
                digest = meta.get("source_sha256", "")
                if meta.get("source_identity") == identity and cache.name.endswith(f".{cache_key(digest)}"
                                                                                   f"{CACHE_SUFFIX}"):
                    ckpt = _load_cache(path, cache, digest)
                    if ckpt is not None:
                        return ckpt, digest, identity
    digest = content_sha256(path)
    for cache in (d / f"{path.name}.{cache_key(digest)}{CACHE_SUFFIX}" for d in dirs):
        if cache.exists():
            ckpt = _load_cache(path, cache, digest)
            if ckpt is not None:
                return ckpt, digest, identity
    return None, digest, identity


def _load_cache(path: Path, cache: Path, digest: str) -> GGUFCheckpoint | None:
    with Progress("load cache", unit="bytes", total=cache.stat().st_size) as p:
        ckpt = _read_cache(cache, digest)
        p.update(cache.stat().st_size)
    if ckpt is not None:
        log.info("read %s from its float32 cache %s", path.name, cache)
    return ckpt


def read_gguf(path: Path, *, cache: bool = True, cache_dir: Path | None = None) -> GGUFCheckpoint:
    """The checkpoint in `path`, from its float32 cache when one is there, else from the file (then cached)."""
    dirs = _cache_dirs(path, cache_dir)
    digest = identity = None
    if cache:
        found, digest, identity = _cached(path, dirs)
        if found is not None:
            return found
    with Progress("read gguf"):
        reader = _open(path)
        _check_complete(path, reader)
        meta = _metadata(path, reader)
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    if len(shapes) != len(reader.tensors):
        raise GGUFError(f"{path}: a tensor name appears twice")
    cfg = gguf_config(path, meta, shapes)
    arch = meta["general.architecture"]
    check_shapes(path, arch, cfg, shapes)  # before a byte is dequantized
    tok, tok_config, generation, add_bos = gguf_tokenizer(path, meta)
    if len(meta["tokenizer.ggml.tokens"]) > cfg["vocab_size"]:
        raise GGUFError(f"{path}: the vocabulary has {len(meta['tokenizer.ggml.tokens'])} tokens but token_embd.weight "
                        f"only {cfg['vocab_size']} rows")
    total = sum(int(t.n_elements) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    log.info("%s: %s, %d tensors (%s)", path.name, arch, len(reader.tensors),
             ", ".join(f"{n} {kind}" for kind, n in types.most_common()))
    with Progress("dequantize", total=total, unit="weights") as p:
        state = read_tensors(path, reader, arch, cfg, p)
    ckpt = GGUFCheckpoint(cfg, state, tok, tok_config, generation, add_bos)
    if cache:
        candidates = cache_paths(path, cache_dir, digest)
        with Progress("write cache"):
            written = _write_cache(ckpt, candidates, path, digest, identity)
        if written is None:
            log.warning("no writable place for the float32 cache of %s (tried %s); the next start dequantizes again",
                        path, ", ".join(str(c.parent) for c in candidates))
    return ckpt
