"""Load a checkpoint directory (Hugging Face layout) into decoder weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paddle

from service.engine.model import LayerWeights, ModelWeights
from service.engine.model_config import ModelConfig, UnsupportedModelError
from service.engine.tokenizer import Tokenizer


class ModelNotFoundError(FileNotFoundError):
    """The model directory is missing or incomplete."""


@dataclass
class LoadedModel:
    name: str
    path: Path
    config: ModelConfig
    weights: ModelWeights
    tokenizer: Tokenizer
    generation_defaults: dict[str, Any]


def _read_state(model_dir: Path) -> dict[str, paddle.Tensor]:
    from safetensors.paddle import load_file

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, paddle.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(model_dir / shard)))
        return state
    single = model_dir / "model.safetensors"
    if single.exists():
        return dict(load_file(str(single)))
    raise ModelNotFoundError(f"{model_dir} has no model.safetensors or model.safetensors.index.json")


def _linear(state: dict[str, paddle.Tensor], name: str, dtype: str) -> paddle.Tensor:
    """HF stores Linear weights as [out, in]; the decoder multiplies x @ W, so keep [in, out]."""
    return state.pop(name).astype(dtype).t().contiguous()


def build_weights(cfg: ModelConfig, state: dict[str, paddle.Tensor], dtype: str) -> ModelWeights:
    def vec(name: str) -> paddle.Tensor:
        return state.pop(name).astype(dtype)

    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = paddle.concat(
            [_linear(state, p + f"self_attn.{n}_proj.weight", dtype) for n in ("q", "k", "v")], axis=1
        )
        bias = None
        if cfg.attention_bias:
            bias = paddle.concat([vec(p + f"self_attn.{n}_proj.bias") for n in ("q", "k", "v")])
        gate_up = paddle.concat(
            [_linear(state, p + "mlp.gate_proj.weight", dtype), _linear(state, p + "mlp.up_proj.weight", dtype)],
            axis=1,
        )
        layers.append(
            LayerWeights(
                input_norm=vec(p + "input_layernorm.weight"),
                qkv=qkv,
                qkv_bias=bias,
                o=_linear(state, p + "self_attn.o_proj.weight", dtype),
                post_norm=vec(p + "post_attention_layernorm.weight"),
                gate_up=gate_up,
                down=_linear(state, p + "mlp.down_proj.weight", dtype),
            )
        )
    embed = vec("model.embed_tokens.weight")
    if "lm_head.weight" in state and not cfg.tie_word_embeddings:
        lm_head = _linear(state, "lm_head.weight", dtype)
    else:
        state.pop("lm_head.weight", None)
        lm_head = embed.t().contiguous()
    return ModelWeights(embed=embed, layers=layers, norm=vec("model.norm.weight"), lm_head=lm_head)


def load_model(model_dir: Path, dtype: str = "float32") -> LoadedModel:
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ModelNotFoundError(
            f"model directory {str(model_dir)!r} has no config.json; pass a local directory in the Hugging Face "
            "layout (config.json, model.safetensors, tokenizer.json) with --model-dir or TOKENSTREAM_MODEL_DIR"
        )
    cfg = ModelConfig.from_dir(model_dir)
    if not (model_dir / "tokenizer.json").exists():
        raise ModelNotFoundError(f"{model_dir} has no tokenizer.json")
    state = _read_state(model_dir)
    try:
        weights = build_weights(cfg, state, dtype)
    except KeyError as exc:
        raise UnsupportedModelError(f"{cfg.architecture} checkpoint in {model_dir} lacks weight {exc}") from exc
    gen_path = model_dir / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    eos = generation.get("eos_token_id")
    if eos is not None:
        ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
        cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": tuple(int(e) for e in ids)})
    return LoadedModel(
        name=model_dir.name,
        path=model_dir,
        config=cfg,
        weights=weights,
        tokenizer=Tokenizer(model_dir),
        generation_defaults=generation,
    )
