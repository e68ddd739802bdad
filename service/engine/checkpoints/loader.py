"""Load a checkpoint directory, or a GGUF file (see service/engine/checkpoints/gguf.py), into decoder weights.

Two directory layouts are accepted, each with one file or several shards:

* Hugging Face: `model.safetensors`, or `model-0000X-of-0000N.safetensors` with `model.safetensors.index.json`.
  Linear weights are stored [out, in].
* PaddleNLP / PaddleFormers (`save_pretrained(..., save_to_hf=False)`, ERNIEKit): `model_state.pdparams`
  (`paddle.save` of the state dict, optionally sharded with `model_state.pdparams.index.json`), or safetensors
  written by Paddle. Linear weights are stored transposed, [in, out]; keys may start with the base model's
  own prefix (`llama.`, `qwen2.`, `ernie.`) instead of `model.`; attention and MLP may be fused
  (`qkv_proj`, `up_gate_proj`).

Which layout a checkpoint uses is decided from explicit signals first (a `.pdparams` file, safetensors metadata
{"format": "np"|"pd"|"paddle"} as PaddleFormers writes it, `"source": "paddle"` in config.json), then checked
against the shapes of non-square projections, which tell the two apart without doubt; only a checkpoint whose
every projection is square and that carries no signal is taken to be in the Hugging Face layout.

A model file is untrusted input. `.pdparams` files are pickles, and unpickling runs whatever code the file carries:
they are read only with `trust_pickle` (--trust-pickle). A hub model is fetched only when named with the `hf:`
prefix, so that a mistyped local path never downloads (and runs) someone else's files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paddle

from service.engine.api import ChatTemplateError
from service.engine.checkpoints.gguf import read_gguf
from service.engine.checkpoints.model_config import DType, ModelConfig, UnsupportedModelError
from service.engine.decoder import LayerWeights, ModelWeights
from service.engine.tokenizer import Tokenizer

log = logging.getLogger("tokenstream.loader")

HF_SINGLE = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
PADDLE_SINGLE = "model_state.pdparams"
PADDLE_INDEX = "model_state.pdparams.index.json"
GGUF_SUFFIX = ".gguf"
PADDLE_FORMATS = ("np", "pd", "paddle")  # safetensors metadata "format" written by Paddle tools
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
# Base-model prefixes that PaddleNLP / ERNIEKit checkpoints use instead of "model.".
PADDLE_PREFIXES = ("llama.", "qwen2.", "mistral.", "ernie.")
HUB_PREFIX = "hf:"  # `--model-dir hf:ORG/NAME`: the one way to ask for a download from the Hugging Face Hub
# Files fetched from the hub: configs, tokenizer, chat template and weights (not optimizer states, etc.); pickled
# .pdparams only when pickles are trusted, since they would be refused at load anyway.
HUB_PATTERNS = ["*.json", "*.safetensors", "chat_template.jinja", "tokenizer.model", "*.tiktoken", "*.txt"]
PICKLE_PATTERNS = ["*.pdparams"]


class CheckpointNotFoundError(FileNotFoundError):
    """The model directory is missing or incomplete, or the model cannot be fetched."""


class PickleRefusedError(UnsupportedModelError):
    """The checkpoint is a pickle (`.pdparams`) and pickles are not trusted (--trust-pickle)."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any]


# -- locating the model ------------------------------------------------------------------------------------


def network_allowed() -> bool:
    """False when the Hugging Face libraries are told to stay offline (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    return True


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HOW = (
    "pass a local directory in the Hugging Face or PaddleFormers layout (config.json, tokenizer.json and "
    "weights) or a GGUF file with --model-dir or TOKENSTREAM_MODEL_DIR, or fetch it from the Hugging Face Hub by "
    f"naming it {HUB_PREFIX}ORG/NAME"
)


def resolve_model(name_or_path: str | os.PathLike[str], allow_network: bool, *, trust_pickle: bool = False) -> Path:
    """A local model directory (or GGUF file) for `name_or_path`.

    `hf:ORG/NAME` is downloaded with huggingface_hub's snapshot_download, only when `allow_network` (`.pdparams`
    only when `trust_pickle`). Anything else is a local path and must exist: a missing path is never looked up on
    the hub, so a typo or a look-alike name cannot fetch someone else's files.
    """
    name = str(name_or_path)
    if name.startswith(HUB_PREFIX):
        return _fetch_from_hub(name[len(HUB_PREFIX):], allow_network, trust_pickle)
    path = Path(name_or_path).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == GGUF_SUFFIX):
        return path
    if path.exists():
        raise CheckpointNotFoundError(f"model path {name!r} is neither a directory nor a {GGUF_SUFFIX} file; {_HOW}")
    if path.suffix == GGUF_SUFFIX:
        raise CheckpointNotFoundError(f"GGUF file {name!r} does not exist; {_HOW}")
    hint = f" (to fetch it from the Hugging Face Hub, write {HUB_PREFIX}{name})" if _REPO_ID.match(name) else ""
    raise CheckpointNotFoundError(f"model directory {name!r} does not exist{hint}; {_HOW}")


def _fetch_from_hub(repo_id: str, allow_network: bool, trust_pickle: bool) -> Path:
    how = (
        "download it beforehand (e.g. `huggingface-cli download ORG/NAME --local-dir DIR`) and pass that local "
        "directory with --model-dir or TOKENSTREAM_MODEL_DIR"
    )
    name = HUB_PREFIX + repo_id
    if not _REPO_ID.match(repo_id) or "/" not in repo_id:
        raise CheckpointNotFoundError(f"{name!r} is not a Hugging Face Hub model id ({HUB_PREFIX}ORG/NAME)")
    if not allow_network:
        raise CheckpointNotFoundError(
            f"model {name!r} cannot be fetched from the Hugging Face Hub: networking is off (HF_HUB_OFFLINE=1 or "
            f"TRANSFORMERS_OFFLINE=1); {how}"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise CheckpointNotFoundError(f"model {name!r}: huggingface_hub is not installed to fetch it; {how}") from exc
    patterns = HUB_PATTERNS + (PICKLE_PATTERNS if trust_pickle else [])
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the caller
        raise CheckpointNotFoundError(
            f"could not fetch model {name!r} from the Hugging Face Hub ({exc}); {how}") from exc


# -- reading tensors ---------------------------------------------------------------------------------------


@dataclass
class RawCheckpoint:
    state: dict[str, paddle.Tensor]
    files: list[Path]
    paddle_signal: bool | None  # True: Paddle says so; False: a Hugging Face tool says so; None: nothing says


def _shards(model_dir: Path, index_name: str) -> list[Path]:
    index = json.loads((model_dir / index_name).read_text())
    return [model_dir / shard for shard in sorted(set(index["weight_map"].values()))]


def _read_checkpoint(model_dir: Path, *, trust_pickle: bool = False) -> RawCheckpoint:
    from safetensors import safe_open
    from safetensors.paddle import load_file

    if (model_dir / HF_INDEX).exists():
        files = _shards(model_dir, HF_INDEX)
    elif (model_dir / HF_SINGLE).exists():
        files = [model_dir / HF_SINGLE]
    elif (model_dir / PADDLE_INDEX).exists():
        files = _shards(model_dir, PADDLE_INDEX)
    elif (model_dir / PADDLE_SINGLE).exists():
        files = [model_dir / PADDLE_SINGLE]
    else:
        raise CheckpointNotFoundError(
            f"{model_dir} has no weights: expected {HF_SINGLE}, {HF_INDEX} with its shards, {PADDLE_SINGLE} "
            f"or {PADDLE_INDEX} with its shards"
        )
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise CheckpointNotFoundError(f"{model_dir} lacks weight shards {missing}")
    pickles = [f.name for f in files if f.suffix == ".pdparams"]
    if pickles and not trust_pickle:
        # Refused before any byte is unpickled: paddle.load runs whatever code a pickle carries.
        raise PickleRefusedError(
            f"{model_dir} holds its weights as pickles ({', '.join(pickles)}), and loading a pickle runs any code "
            "it carries; convert them to safetensors (PaddleFormers: save_pretrained(..., safe_serialization=True)), "
            "or pass --trust-pickle true (TOKENSTREAM_TRUST_PICKLE=1) if you trust where the file came from"
        )
    state: dict[str, paddle.Tensor] = {}
    signal: bool | None = None
    for f in files:
        if f.suffix == ".pdparams":
            signal = True
            for key, value in paddle.load(str(f)).items():
                if isinstance(value, paddle.Tensor):
                    state[key] = value
                elif isinstance(value, np.ndarray):
                    state[key] = paddle.to_tensor(value)
                # anything else (e.g. "StructuredToParameterName@@", a name map) carries no weights
            continue
        with safe_open(str(f), framework="np") as handle:
            fmt = (handle.metadata() or {}).get("format")
        if fmt is not None and signal is None:
            signal = fmt in PADDLE_FORMATS
        state.update(load_file(str(f)))
    return RawCheckpoint(state=state, files=files, paddle_signal=signal)


# -- layouts -----------------------------------------------------------------------------------------------


def _normalize_keys(state: dict[str, paddle.Tensor]) -> str | None:
    """Rename a base-model prefix such as `llama.` to `model.` in place; returns the prefix found, if any."""
    if any(k.startswith("model.") for k in state):
        return None
    for prefix in PADDLE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            for key in [k for k in state if k.startswith(prefix)]:
                state["model." + key[len(prefix) :]] = state.pop(key)
            return prefix
    return None


def _linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF [out, in] shape of each projection, by the key suffix after `model.layers.N.`."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.qkv_proj.weight": (q + 2 * kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.up_gate_proj.weight": (2 * i, h),
        "mlp.gate_up_proj.weight": (2 * i, h),
        "mlp.down_proj.weight": (h, i),
    }


def _layout_from_shapes(cfg: ModelConfig, state: dict[str, paddle.Tensor]) -> str | None:
    """'hf' or 'paddle' as the non-square projections of layer 0 show it; None when every one is square."""
    for suffix, (out, inp) in _linear_shapes(cfg).items():
        t = state.get(f"model.layers.0.{suffix}")
        if t is None or out == inp:
            continue
        shape = tuple(t.shape)
        if shape == (out, inp):
            return "hf"
        if shape == (inp, out):
            return "paddle"
        raise UnsupportedModelError(
            f"{cfg.architecture} weight model.layers.0.{suffix} has shape {list(shape)}, which fits neither "
            f"[{out}, {inp}] nor [{inp}, {out}] from config.json"
        )
    return None


def detect_layout(cfg: ModelConfig, state: dict[str, paddle.Tensor], paddle_signal: bool | None) -> str:
    """'hf' (Linear weights [out, in]) or 'paddle' ([in, out]); `state` must have `model.` keys already."""
    by_shape = _layout_from_shapes(cfg, state)
    by_signal = None if paddle_signal is None else ("paddle" if paddle_signal else "hf")
    if by_shape is not None:
        if by_signal is not None and by_signal != by_shape:
            log.warning("checkpoint is marked as %s layout but its weight shapes are %s layout; using the shapes",
                        by_signal, by_shape)
        return by_shape
    return by_signal or "hf"


# -- building decoder weights ------------------------------------------------------------------------------


def _check_shape(name: str, t: paddle.Tensor, want: tuple[int, ...]) -> None:
    if tuple(t.shape) != want:
        raise UnsupportedModelError(f"weight {name} has shape {list(t.shape)}, expected {list(want)} from config.json")


def _interleave_perm(heads: int, d: int) -> np.ndarray:
    """Per head, even dims first then odd: rotate-half RoPE on permuted q/k is interleaved RoPE on the originals.

    q.k is unchanged by permuting both the same way, and V is not permuted, so attention is exact.
    """
    within = np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
    return (np.arange(heads)[:, None] * d + within[None, :]).reshape(-1)


class _WeightBuilder:
    def __init__(self, cfg: ModelConfig, state: dict[str, paddle.Tensor], dtype: DType, layout: str,
                 fused_qkv: str) -> None:
        self.cfg, self.state, self.dtype, self.layout, self.fused_qkv = cfg, state, dtype, layout, fused_qkv
        self.shapes = _linear_shapes(cfg)

    def vec(self, name: str, size: int) -> paddle.Tensor:
        t = self.state.pop(name)
        _check_shape(name, t, (size,))
        return t.astype(self.dtype)

    def linear(self, name: str, suffix: str) -> paddle.Tensor:
        """[in, out] for x @ W, whichever way the checkpoint stores it."""
        t = self.state.pop(name)
        out, inp = self.shapes[suffix]
        if self.layout == "hf":
            _check_shape(name, t, (out, inp))
            return t.astype(self.dtype).t().contiguous()
        _check_shape(name, t, (inp, out))
        return t.astype(self.dtype)

    def qkv(self, p: str) -> tuple[paddle.Tensor, paddle.Tensor | None]:
        """Fused [H, (nh + 2 kv) d] weight and [(nh + 2 kv) d] bias, q and k in the decoder's RoPE order."""
        cfg = self.cfg
        q_w, kv_w = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if p + "self_attn.qkv_proj.weight" in self.state:
            w = self.linear(p + "self_attn.qkv_proj.weight", "self_attn.qkv_proj.weight")
            b = self.state.pop(p + "self_attn.qkv_proj.bias", None)
            if self.fused_qkv == "grouped":  # PaddleFormers: per kv head [its g query heads, k, v]
                order = self._grouped_order()
                w = paddle.gather(w, paddle.to_tensor(order), axis=1)
                b = None if b is None else paddle.gather(b, paddle.to_tensor(order))
            if b is not None:
                _check_shape(p + "self_attn.qkv_proj.bias", b, (q_w + 2 * kv_w,))
                b = b.astype(self.dtype)
        else:
            w = paddle.concat([self.linear(p + f"self_attn.{n}_proj.weight", f"self_attn.{n}_proj.weight")
                               for n in ("q", "k", "v")], axis=1)
            b = None
            if cfg.attention_bias:
                b = paddle.concat([self.vec(p + f"self_attn.{n}_proj.bias", size)
                                   for n, size in (("q", q_w), ("k", kv_w), ("v", kv_w))])
        if cfg.attention_bias and b is None:
            raise KeyError(p + "self_attn.q_proj.bias")
        if cfg.rope_interleaved:
            perm = np.concatenate([
                _interleave_perm(cfg.num_heads, cfg.head_dim),
                q_w + _interleave_perm(cfg.num_kv_heads, cfg.head_dim),
                np.arange(q_w + kv_w, q_w + 2 * kv_w),
            ])
            index = paddle.to_tensor(perm)
            w = paddle.gather(w, index, axis=1)
            b = None if b is None else paddle.gather(b, index)
        return w.contiguous(), b

    def _grouped_order(self) -> np.ndarray:
        """Column order that turns per-kv-head [q_0..q_{g-1}, k, v] blocks into [all q | all k | all v]."""
        cfg = self.cfg
        kv, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        block = np.arange(kv * (g + 2) * d).reshape(kv, g + 2, d)
        return np.concatenate([block[:, :g].reshape(-1), block[:, g].reshape(-1), block[:, g + 1].reshape(-1)])

    def gate_up(self, p: str) -> paddle.Tensor:
        for fused in ("mlp.up_gate_proj.weight", "mlp.gate_up_proj.weight"):  # [gate | up] along the output
            if p + fused in self.state:
                return self.linear(p + fused, fused)
        return paddle.concat([self.linear(p + "mlp.gate_proj.weight", "mlp.gate_proj.weight"),
                              self.linear(p + "mlp.up_proj.weight", "mlp.up_proj.weight")], axis=1)

    def lm_head(self, embed: paddle.Tensor) -> paddle.Tensor:
        cfg = self.cfg
        head = self.state.pop("lm_head.weight", None)
        if cfg.tie_word_embeddings:
            return embed.t().contiguous()
        if head is None:
            raise KeyError("lm_head.weight")
        v, h = cfg.vocab_size, cfg.hidden_size
        # [V, H] like nn.Linear / PaddleFormers' LMHead, or [H, V] as older PaddleNLP and ERNIEKit store it.
        if tuple(head.shape) == (v, h):
            return head.astype(self.dtype).t().contiguous()
        _check_shape("lm_head.weight", head, (h, v))
        return head.astype(self.dtype)


def build_weights(
    cfg: ModelConfig, state: dict[str, paddle.Tensor], dtype: DType, layout: str = "hf", fused_qkv: str = "grouped"
) -> ModelWeights:
    """Decoder weights from a state dict with `model.` keys; pops what it uses.

    layout: 'hf' ([out, in] Linear weights) or 'paddle' ([in, out]). fused_qkv: how a fused `qkv_proj` orders its
    columns: 'grouped' (PaddleFormers: per kv head, its queries then k then v) or 'plain' ([q | k | v], ERNIEKit).
    """
    b = _WeightBuilder(cfg, state, dtype, layout, fused_qkv)
    h = cfg.hidden_size
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv, bias = b.qkv(p)
        layers.append(
            LayerWeights(
                input_norm=b.vec(p + "input_layernorm.weight", h),
                qkv=qkv,
                qkv_bias=bias,
                o=b.linear(p + "self_attn.o_proj.weight", "self_attn.o_proj.weight"),
                post_norm=b.vec(p + "post_attention_layernorm.weight", h),
                gate_up=b.gate_up(p),
                down=b.linear(p + "mlp.down_proj.weight", "mlp.down_proj.weight"),
            )
        )
    embed = state.pop("model.embed_tokens.weight")
    _check_shape("model.embed_tokens.weight", embed, (cfg.vocab_size, h))
    embed = embed.astype(dtype)
    lm_head = b.lm_head(embed)
    norm = b.vec("model.norm.weight", h)
    return ModelWeights(embed=embed, layers=layers, norm=norm, lm_head=lm_head)


# Buffers some exporters keep in the state dict; they carry no learned weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def check_dtype(dtype: DType) -> None:
    """Refuse a dtype that is unknown, or that the current Paddle device has no matmul kernel for.

    Paddle's CPU kernels are float32 (bfloat16 and float16 matmul are GPU-only in Paddle 3.3), so half
    precision fails here with a clear message rather than inside the first forward.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: {', '.join(SUPPORTED_DTYPES)}")
    if dtype == "float32":
        return
    try:
        probe = paddle.ones([2, 2], dtype=dtype)
        paddle.matmul(probe, probe)
    except (RuntimeError, NotImplementedError, ValueError) as exc:
        raise ValueError(
            f"dtype {dtype!r} is not supported on device {paddle.get_device()!r} by this Paddle build "
            f"(no {dtype} matmul kernel); use float32 there"
        ) from exc


def load_model(
    model_dir: str | os.PathLike[str], dtype: DType = "float32", allow_network: bool | None = None, *,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Load config, tokenizer, generation defaults and weights.

    `model_dir` is a local directory, a `.gguf` file, or a directory holding exactly one `.gguf` file and no
    config.json; `hf:ORG/NAME` is fetched only when networking is allowed (see resolve_model; by default as
    HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE say). `.pdparams` pickles load only with `trust_pickle`.
    """
    check_dtype(dtype)
    model_dir = resolve_model(model_dir, network_allowed() if allow_network is None else allow_network,
                              trust_pickle=trust_pickle)
    gguf_file = find_gguf(model_dir)
    if gguf_file is not None:
        return _load_gguf(gguf_file, dtype)
    raw_cfg = json.loads((model_dir / "config.json").read_text())
    cfg = ModelConfig.from_dict(raw_cfg)
    if not (model_dir / "tokenizer.json").exists():
        raise CheckpointNotFoundError(f"{model_dir} has no tokenizer.json")
    tokenizer = _tokenizer(model_dir, lambda: Tokenizer.from_dir(model_dir))  # before the weights: fail fast
    ckpt = _read_checkpoint(model_dir, trust_pickle=trust_pickle)
    state = ckpt.state
    prefix = _normalize_keys(state)
    signal = ckpt.paddle_signal
    if signal is None and raw_cfg.get("source") == "paddle":
        signal = True
    layout = detect_layout(cfg, state, signal)
    # ERNIEKit (`ernie.` keys) concatenates q, k and v; PaddleFormers groups them per kv head.
    fused_qkv = "plain" if prefix == "ernie." else "grouped"
    weights = _build_all(cfg, state, dtype, str(model_dir), layout=layout, fused_qkv=fused_qkv)
    log.info("loaded %s (%s, %s layout, %d file(s)) as %s", model_dir, cfg.architecture, layout, len(ckpt.files),
             dtype)
    generation = _generation_defaults(model_dir)
    return LoadedModel(
        name=model_dir.name,
        path=model_dir,
        config=_with_eos(cfg, generation),
        weights=weights,
        tokenizer=tokenizer,
        generation_defaults=generation,
    )


def find_gguf(path: Path) -> Path | None:
    """The GGUF file to load: `path` itself, or the one `.gguf` in a directory without config.json."""
    if path.is_file():
        return path
    if (path / "config.json").exists():
        return None
    found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointNotFoundError(
            f"model directory {str(path)!r} holds {len(found)} GGUF files ({', '.join(f.name for f in found)}); "
            "pass the one to load as --model-dir / TOKENSTREAM_MODEL_DIR"
        )
    raise CheckpointNotFoundError(
        f"model directory {str(path)!r} has neither config.json nor a {GGUF_SUFFIX} file; pass a local directory in "
        "the Hugging Face layout (config.json, model.safetensors, tokenizer.json) or a GGUF file with --model-dir "
        "or TOKENSTREAM_MODEL_DIR"
    )


def _tokenizer(where: Path, make: Callable[[], Tokenizer]) -> Tokenizer:
    """The model's tokenizer; a chat template that does not compile fails the load, naming the model."""
    try:
        return make()
    except ChatTemplateError as exc:
        raise UnsupportedModelError(f"{where}: {exc}") from exc


def _load_gguf(path: Path, dtype: DType) -> LoadedModel:
    ckpt = read_gguf(path)
    cfg = ModelConfig.from_dict(ckpt.config)
    tokenizer = _tokenizer(path, lambda: Tokenizer(ckpt.tokenizer, ckpt.tokenizer_config, add_bos=ckpt.add_bos))
    # Zero-copy views of the float32 arrays (paddle.to_tensor would copy 0.5 GB for a 135M model).
    state = {name: paddle.from_dlpack(w.__dlpack__()) for name, w in ckpt.state.items()}
    ckpt.state.clear()
    weights = _build_all(cfg, state, dtype, str(path), layout="hf", fused_qkv="plain")
    log.info("loaded %s (%s, GGUF%s) as %s", path, cfg.architecture, ", from its float32 cache" if ckpt.from_cache
             else "", dtype)
    return LoadedModel(
        name=path.stem,
        path=path,
        config=_with_eos(cfg, ckpt.generation),
        weights=weights,
        tokenizer=tokenizer,
        generation_defaults=ckpt.generation,
    )


def _build_all(cfg: ModelConfig, state: dict[str, paddle.Tensor], dtype: DType, where: str, **layout: str,
               ) -> ModelWeights:
    """build_weights, refusing a checkpoint that lacks weights or has weights the decoder would ignore."""
    try:
        weights = build_weights(cfg, state, dtype, **layout)
    except KeyError as exc:
        raise UnsupportedModelError(f"{cfg.architecture} checkpoint in {where} lacks weight {exc}") from exc
    leftover = sorted(k for k in state if not _IGNORED.search(k))
    if leftover:
        shown = ", ".join(leftover[:6]) + (", ..." if len(leftover) > 6 else "")
        raise UnsupportedModelError(
            f"{cfg.architecture} checkpoint in {where} has weights the decoder would ignore: {shown}"
        )
    return weights


def _with_eos(cfg: ModelConfig, generation: dict[str, Any]) -> ModelConfig:
    """The config with the generation defaults' EOS ids, which override config.json's."""
    eos = generation.get("eos_token_id")
    if eos is None:
        return cfg
    ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return dataclasses.replace(cfg, eos_token_ids=tuple(int(e) for e in ids))


def _generation_defaults(model_dir: Path) -> dict[str, Any]:
    """generation_config.json as a dict (eos ids, default sampling values); empty when absent."""
    path = model_dir / "generation_config.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedModelError(f"{path} is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
