"""Model hyper-parameters read from a Hugging Face (or PaddleFormers) `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Paddle's type stubs accept dtype names only as a Literal; configs carry them as plain strings.
DType = Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Ernie4_5ForCausalLM")
# Other spellings of the same architectures: ERNIEKit / FastDeploy / the original remote code write
# "Ernie4_5_ForCausalLM" for ERNIE-4.5 dense.
ARCHITECTURE_ALIASES = {"Ernie4_5_ForCausalLM": "Ernie4_5ForCausalLM"}
SUPPORTED_ROPE_TYPES = (None, "default", "linear", "llama3")
# The decoder's MLP is SwiGLU: silu(gate) * up.
SUPPORTED_ACTIVATIONS = ("silu", "swish")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or layout is one the engine cannot run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # The longest context the decoder computes exactly: the checkpoint's own limit, capped at the sliding window
    # (within the window, sliding-window attention is plain causal attention).
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    # ERNIE-4.5 rotates interleaved pairs (x0, x1), (x2, x3), ... instead of halves (x_i, x_{i + d/2}). The loader
    # permutes q/k projection rows so that the decoder's rotate-half RoPE computes exactly that.
    rope_interleaved: bool = False
    sliding_window: int | None = None  # as configured; max_position_embeddings is already capped at it

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        archs = raw.get("architectures") or ["LlamaForCausalLM"]
        arch = ARCHITECTURE_ALIASES.get(archs[0], archs[0])
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        ernie = arch == "Ernie4_5ForCausalLM"
        act = raw.get("hidden_act") or raw.get("hidden_activation") or "silu"
        if act not in SUPPORTED_ACTIVATIONS:
            raise UnsupportedModelError(f"{arch} with hidden_act {act!r} is not supported (only SwiGLU with silu)")
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # Qwen2 always has q/k/v biases (and none elsewhere). Llama puts attention_bias on o_proj too and
        # mlp_bias on the MLP; ERNIE's use_bias covers every Linear (and PaddleFormers' norms): the decoder
        # has no o_proj or MLP biases, so those are refused rather than silently dropped.
        bias = arch == "Qwen2ForCausalLM"
        if ernie and raw.get("use_bias"):
            raise UnsupportedModelError(f"{arch} with use_bias=true (biases on every projection) is not supported")
        if arch in ("LlamaForCausalLM", "MistralForCausalLM") and (raw.get("attention_bias") or raw.get("mlp_bias")):
            raise UnsupportedModelError(
                f"{arch} with attention_bias/mlp_bias=true (biases on o_proj / the MLP) is not supported"
            )
        theta, scaling = _rope(raw, default_theta=500000.0 if ernie else 10000.0)
        ratio = float(raw.get("compression_ratio") or 1.0)  # ERNIE's original code divides positions by it
        if ratio != 1.0:
            if scaling is not None:
                raise UnsupportedModelError(f"{arch} with both compression_ratio and rope_scaling is not supported")
            scaling = {"rope_type": "linear", "factor": ratio}
        max_pos = int(raw.get("max_position_embeddings") or 2048)
        window = _sliding_window(arch, raw)
        if window is not None:
            max_pos = min(max_pos, window)
        tied = raw.get("tie_word_embeddings")
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            # transformers' defaults where the key is missing: ERNIE-4.5 ties, the others do not.
            tie_word_embeddings=bool(ernie if tied is None else tied),
            attention_bias=bias,
            eos_token_ids=tuple(int(e) for e in eos_ids),
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            rope_interleaved=ernie,
            sliding_window=window,
        )


def _rope(raw: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers >= 5 writes only `rope_parameters`."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type parameters
    theta = raw.get("rope_theta")
    scaling = raw.get("rope_scaling") or None
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if scaling is None and (params.get("rope_type") or params.get("type") or "default") != "default":
            scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling {kind!r} is not supported; supported: default, linear, llama3"
            )
        if kind in (None, "default"):
            scaling = None
    return float(default_theta if theta is None else theta), scaling


def _sliding_window(arch: str, raw: dict[str, Any]) -> int | None:
    """The attention window, or None when every layer attends to the whole context."""
    window = raw.get("sliding_window")
    if window is None:
        return None
    if arch == "Qwen2ForCausalLM":
        # Qwen2 applies its window only with use_sliding_window (and then only to some layers).
        layer_types = raw.get("layer_types") or []
        if not raw.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    elif arch != "MistralForCausalLM":
        return None
    return int(window)
