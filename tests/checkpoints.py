"""Tiny random checkpoints of each supported architecture, written by the reference libraries themselves.

Each `TinyModel` is a seeded random model of one architecture built with the library that serves as its
numerical reference: PaddleFormers for Llama, Hugging Face transformers on PyTorch CPU for Llama 3 RoPE scaling,
Qwen2, Mistral and ERNIE-4.5. It saves itself in the on-disk layouts the loader accepts:

  hf                  transformers / PaddleFormers `save_pretrained`: one `model.safetensors`
  hf-sharded          the same with a tiny max_shard_size: `model-0000X-of-0000N.safetensors` + index
  hf-bf16             `model.safetensors` in bfloat16 (reference: the same model rounded to bfloat16)
  paddle-pdparams     PaddleFormers `save_pretrained(save_to_hf=False)`: `model_state.pdparams`, [in, out] Linears
  paddle-safetensors  the same with safe_serialization: `model.safetensors` with metadata {"format": "np"}
  erniekit            ERNIE only: ERNIEKit's layout (`ernie.` keys, plain fused qkv_proj, fused up_gate_proj)

PaddleFormers 1.2 cannot import its Qwen2 model without paddlefleet, so Qwen2's Paddle layouts go through the
same steps as its save_pretrained(save_to_hf=False) with PaddleFormers' own helpers instead: the native state dict
(HF weights with `transpose_weight_keys` transposed by `convert_transpose_selected_weights`), then `paddle.save`
or `prepare_safe_save_state_dict` + safetensors. Every directory also gets a small WordLevel tokenizer.json,
tokenizer_config.json and a generation_config.json with sampling defaults.

Weights are drawn large enough (std 0.2 at hidden 32) that attention is far from uniform: a RoPE or layout
mistake moves logits by O(0.1-1), not O(1e-4).
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

VOCAB = 256
GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.7, "top_p": 0.9}
TRANSPOSED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def transformers_with_torch() -> Any:
    """The transformers module with its PyTorch models importable.

    PaddleFormers imports transformers with PyTorch hidden when torch is not imported yet, and paddlecodec ships
    a `torchcodec` module without package metadata that breaks transformers' audio utilities: import torch first,
    hide torchcodec, and re-import transformers if it was imported without PyTorch.
    """
    import torch  # noqa: F401

    sys.modules.setdefault("torchcodec", None)  # type: ignore[arg-type]
    import transformers
    from transformers.utils import import_utils

    if not import_utils.is_torch_available():
        for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
            del sys.modules[name]
        import transformers
    return transformers


def paddleformers() -> Any:
    transformers_with_torch()  # first, so that PaddleFormers leaves PyTorch visible to transformers
    import paddleformers.transformers as pft

    return pft


@dataclass(frozen=True)
class Spec:
    name: str
    reference: str  # "paddleformers" or "transformers"
    config: dict[str, Any]
    layouts: tuple[str, ...]
    seed: int = 0


_BASE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "bos_token_id": 1,
         "eos_token_id": 2}
_HF_ALL = ("hf", "hf-sharded", "paddle-pdparams", "paddle-safetensors")

SPECS: dict[str, Spec] = {
    # Every projection square (32x32, no GQA): only explicit signals can tell the layouts apart.
    "llama": Spec("llama", "paddleformers",
                  {**_BASE, "intermediate_size": 32, "num_key_value_heads": 4, "tie_word_embeddings": False},
                  _HF_ALL, seed=1),
    "llama3": Spec("llama3", "transformers",
                   {**_BASE, "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
                   ("hf",), seed=2),
    "qwen2": Spec("qwen2", "transformers",
                  {**_BASE, "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
                  (*_HF_ALL, "hf-bf16"), seed=3),
    "mistral": Spec("mistral", "transformers",
                    {**_BASE, "architectures": ["MistralForCausalLM"], "sliding_window": None}, ("hf", "hf-sharded"),
                    seed=4),
    # A window of 16 covers every position the test runs, so attention is exact; the loader caps the context.
    "mistral-window": Spec("mistral-window", "transformers",
                           {**_BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 16}, ("hf",), seed=5),
    # head_dim 16 != hidden / heads = 8, as in ERNIE-4.5-0.3B (128 vs 64).
    "ernie": Spec("ernie", "transformers",
                  {**_BASE, "architectures": ["Ernie4_5ForCausalLM"], "head_dim": 16, "tie_word_embeddings": True},
                  (*_HF_ALL, "erniekit"), seed=6),
}


def write_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<eot>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))


def _draw(rng: np.random.Generator, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if len(shape) == 1 and "norm" in name:
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.2 * rng.standard_normal(shape)).astype(np.float32)


@dataclass
class TinyModel:
    spec: Spec
    root: Path
    model: Any = None
    hf_dir: Path | None = None  # the torch model's own save, the source of its Paddle layouts
    _dirs: dict[str, Path] = field(default_factory=dict)

    # -- building ------------------------------------------------------------------------------------------

    @classmethod
    def build(cls, spec: Spec, root: Path) -> TinyModel:
        tiny = cls(spec, root)
        if spec.reference == "paddleformers":
            tiny._build_paddleformers()
        else:
            tiny._build_transformers()
        return tiny

    def _build_paddleformers(self) -> None:
        import paddle

        pft = paddleformers()
        cfg = pft.LlamaConfig(**self.spec.config, fuse_rms_norm=False, use_flash_attention=False)
        model = pft.LlamaForCausalLM(cfg)
        model.eval()
        rng = np.random.default_rng(self.spec.seed)
        with paddle.no_grad():
            for name, p in sorted(model.named_parameters()):
                p.set_value(paddle.to_tensor(_draw(rng, name, tuple(p.shape))))
        self.model = model

    def _build_transformers(self) -> None:
        import torch

        tf = transformers_with_torch()
        raw = dict(self.spec.config)
        arch = raw.pop("architectures")[0]
        config_cls = {"LlamaForCausalLM": tf.LlamaConfig, "Qwen2ForCausalLM": tf.Qwen2Config,
                      "MistralForCausalLM": tf.MistralConfig, "Ernie4_5ForCausalLM": tf.Ernie4_5Config}[arch]
        cfg = config_cls(**raw, attn_implementation="eager")
        model = getattr(tf, arch)(cfg).eval()
        rng = np.random.default_rng(self.spec.seed)
        with torch.no_grad():
            for name, p in sorted(model.named_parameters()):
                p.copy_(torch.from_numpy(_draw(rng, name, tuple(p.shape))))
        self.model = model

    # -- reference -----------------------------------------------------------------------------------------

    def reference_logits(self, ids: list[int], bf16: bool = False) -> np.ndarray:
        """Logits [T, V] of the reference library's full forward over `ids` (float32)."""
        if self.spec.reference == "paddleformers":
            import paddle

            with paddle.no_grad():
                out = self.model(paddle.to_tensor([ids], dtype="int64"))
            logits = out.logits if hasattr(out, "logits") else out[0]
            return logits[0].astype("float32").numpy()
        import torch

        model = self.model
        if bf16:  # the bfloat16 checkpoint's weights, computed in float32 as the loader does by default
            model = type(model)(model.config).eval()
            model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in self.model.state_dict().items()})
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    # -- layouts -------------------------------------------------------------------------------------------

    def save(self, layout: str) -> Path:
        """The model's directory in `layout` (written on first use)."""
        if layout in self._dirs:
            return self._dirs[layout]
        if layout not in self.spec.layouts:
            raise ValueError(f"{self.spec.name} is not built in layout {layout!r}")
        out = self.root / f"{self.spec.name}-{layout}"
        if out.exists():
            shutil.rmtree(out)
        if self.spec.reference == "paddleformers":
            self._save_paddleformers(layout, out)
        else:
            self._save_transformers(layout, out)
        for stray in out.glob("saved_signal_*"):  # PaddleFormers' flex-checkpoint completion marker
            stray.unlink()
        write_tokenizer(out)
        self._dirs[layout] = out
        return out

    def _save_paddleformers(self, layout: str, out: Path) -> None:
        m = self.model
        if layout == "hf":  # the classic path, converted to HF: model.safetensors, metadata {"format": "pt"}
            m.save_pretrained(str(out), save_checkpoint_format="naive")
        elif layout == "hf-sharded":  # PaddleFormers 1.2's default flex-checkpoint path, HF layout, sharded
            m.save_pretrained(str(out), max_shard_size="20KB")
        elif layout == "paddle-pdparams":
            m.save_pretrained(str(out), save_to_hf=False, save_checkpoint_format="naive")
        elif layout == "paddle-safetensors":
            m.save_pretrained(str(out), save_to_hf=False, save_checkpoint_format="naive", safe_serialization=True)
        else:
            raise ValueError(layout)

    def _hf_dir(self) -> Path:
        if self.hf_dir is None:
            self.hf_dir = self.root / f"{self.spec.name}-hf-source"
            self.model.save_pretrained(str(self.hf_dir))
        return self.hf_dir

    def _save_transformers(self, layout: str, out: Path) -> None:
        import torch

        m = self.model
        if layout == "hf":
            m.save_pretrained(str(out))
        elif layout == "hf-sharded":
            m.save_pretrained(str(out), max_shard_size="20KB")
        elif layout == "hf-bf16":
            bf16 = type(m)(m.config).eval()
            bf16.load_state_dict(m.state_dict())
            bf16.to(torch.bfloat16).save_pretrained(str(out))
        elif layout in ("paddle-pdparams", "paddle-safetensors"):
            if self.spec.config["architectures"][0] == "Ernie4_5ForCausalLM":
                self._save_paddleformers_ernie(layout, out)
            else:
                self._save_paddle_native(layout, out)
        elif layout == "erniekit":
            self._save_erniekit(out)
        else:
            raise ValueError(layout)

    def _save_paddleformers_ernie(self, layout: str, out: Path) -> None:
        """PaddleFormers' own ERNIE-4.5: load the HF save, then save_pretrained in its native layout."""
        pft = paddleformers()
        model = pft.Ernie4_5ForCausalLM.from_pretrained(str(self._hf_dir()), dtype="float32")
        model.save_pretrained(str(out), save_to_hf=False, save_checkpoint_format="naive",
                              safe_serialization=layout == "paddle-safetensors")

    def _save_paddle_native(self, layout: str, out: Path) -> None:
        """What PaddleFormers' save_pretrained(save_to_hf=False) writes, through its own helpers."""
        import paddle
        from safetensors.numpy import save_file

        pft = paddleformers()
        from paddleformers.transformers.conversion_utils import ConversionMixin
        from paddleformers.transformers.model_utils import prepare_safe_save_state_dict

        del pft
        state = {k: v.detach().float().numpy() for k, v in self.model.state_dict().items()}
        state = ConversionMixin.convert_transpose_selected_weights(state, list(TRANSPOSED))
        out.mkdir(parents=True)
        config = json.loads((self._hf_dir() / "config.json").read_text()) | {"source": "paddle"}
        (out / "config.json").write_text(json.dumps(config, indent=2))
        if layout == "paddle-pdparams":
            paddle.save({k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in state.items()},
                        str(out / "model_state.pdparams"))
        else:
            tensors = {k: paddle.to_tensor(np.ascontiguousarray(v)) for k, v in state.items()}
            arrays, metadata = prepare_safe_save_state_dict(tensors, save_to_hf=False)
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "model.safetensors"),
                      metadata=metadata)

    def _save_erniekit(self, out: Path) -> None:
        """ERNIEKit's Paddle layout, the inverse of ERNIE's tools/paddle2torch converter: `ernie.` keys,
        [in, out] Linears, qkv_proj = [q | k | v] and up_gate_proj = [gate | up] along the output axis."""
        from safetensors.numpy import save_file

        state = {k: v.detach().float().numpy() for k, v in self.model.state_dict().items()}
        pd: dict[str, np.ndarray] = {}
        for i in range(self.spec.config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            q, k, v = (state.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            pd[p + "self_attn.qkv_proj.weight"] = np.concatenate([q.T, k.T, v.T], axis=1)
            pd[p + "self_attn.o_proj.weight"] = state.pop(p + "self_attn.o_proj.weight").T
            gate, up = state.pop(p + "mlp.gate_proj.weight"), state.pop(p + "mlp.up_proj.weight")
            pd[p + "mlp.up_gate_proj.weight"] = np.concatenate([gate.T, up.T], axis=1)
            pd[p + "mlp.down_proj.weight"] = state.pop(p + "mlp.down_proj.weight").T
        pd.update(state)  # norms, embeddings, (tied) lm_head
        pd = {("ernie." + k[len("model."):] if k.startswith("model.") else k): np.ascontiguousarray(v)
              for k, v in pd.items()}
        out.mkdir(parents=True)
        save_file(pd, str(out / "model.safetensors"), metadata={"format": "np"})
        config = json.loads((self._hf_dir() / "config.json").read_text())
        # ERNIEKit's spelling of the architecture and its pre-transformers-5 RoPE keys.
        config["architectures"] = ["Ernie4_5_ForCausalLM"]
        config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
        config["compression_ratio"] = 1.0
        (out / "config.json").write_text(json.dumps(config, indent=2))
