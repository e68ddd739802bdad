"""References for the decoder, and the one way its logits are compared with them.

- NumpyLlama: an independent, deliberately naive Llama forward in float64 numpy over the whole sequence. No KV
  cache, no batching, no Paddle: every step recomputes everything from the HF-layout weights on disk.
- our_logits / max_diff: our decoder's logits over a prompt prefilled in chunks and in one piece, then batched
  decode steps, against a reference's logits for the same ids (tests/test_numerics.py, tests/test_gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from service.engine.checkpoints.loader import LoadedModel
from service.engine.decoder import LlamaDecoder
from service.engine.kv_cache import SlotKVCache

PROMPT, DECODE = 10, 3  # prompt tokens, then decode steps: a comparison covers PROMPT + DECODE ids
MAX_CONTEXT = 64


class NumpyLlama:
    def __init__(self, model_dir: Path) -> None:
        cfg = json.loads((model_dir / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(str(model_dir / "model.safetensors")).items()}
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads", self.heads)
        self.head_dim = cfg["hidden_size"] // self.heads
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.lm_head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w

    def _rope(self, x: np.ndarray, t: int) -> np.ndarray:  # x: [T, heads, d]
        d = self.head_dim
        inv = 1.0 / (self.theta ** (np.arange(0, d, 2) / d))
        ang = np.outer(np.arange(t), inv)
        cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
        sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
        rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
        return x * cos + rot * sin

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [V] for the next token after `ids`."""
        t, d = len(ids), self.head_dim
        x = self.w["model.embed_tokens.weight"][ids]
        causal = np.triu(np.full((t, t), -np.inf), 1)
        group = self.heads // self.kv_heads
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = self._rms(x, self.w[p + "input_layernorm.weight"])
            q = (h @ self.w[p + "self_attn.q_proj.weight"].T).reshape(t, self.heads, d)
            k = (h @ self.w[p + "self_attn.k_proj.weight"].T).reshape(t, self.kv_heads, d)
            v = (h @ self.w[p + "self_attn.v_proj.weight"].T).reshape(t, self.kv_heads, d)
            q, k = self._rope(q, t), self._rope(k, t)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o = np.einsum("hqk,khd->qhd", s, v).reshape(t, self.heads * d)
            x = x + o @ self.w[p + "self_attn.o_proj.weight"].T
            h = self._rms(x, self.w[p + "post_attention_layernorm.weight"])
            gate = h @ self.w[p + "mlp.gate_proj.weight"].T
            up = h @ self.w[p + "mlp.up_proj.weight"].T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w[p + "mlp.down_proj.weight"].T
        return self._rms(x[-1], self.w["model.norm.weight"]) @ self.lm_head.T

    def greedy(self, prompt: list[int], n: int, min_gap: float = 1e-4) -> list[int]:
        """Greedy continuation; stops early where the top two logits are too close to call across precisions."""
        ids, out = list(prompt), []
        for _ in range(n):
            z = self.logits(ids)
            top2 = np.partition(z, -2)[-2:]
            if top2[1] - top2[0] < min_gap:
                break
            tok = int(np.argmax(z))
            out.append(tok)
            ids.append(tok)
        return out


def our_logits(model: LoadedModel, ids: list[int], dtype: str = "float32",
               weights: object = None) -> tuple[np.ndarray, np.ndarray]:
    """(prefill logits [2, V]: slot 0 in two chunks, slot 1 in one; decode logits [DECODE, 2, V], both slots)."""
    cfg = model.config
    decoder = LlamaDecoder(cfg, weights or model.weights, MAX_CONTEXT, dtype)
    cache = SlotKVCache(cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim, MAX_CONTEXT, dtype)
    prompt = np.asarray(ids[:PROMPT], dtype=np.int64)
    assert decoder.prefill(cache, 0, prompt[:6], 0, want_logits=False) is None
    chunked = decoder.prefill(cache, 0, prompt[6:], 6, want_logits=True)
    single = decoder.prefill(cache, 1, prompt, 0, want_logits=True)
    steps = []
    for s in range(DECODE):
        pos = PROMPT + s
        out = decoder.decode_step(cache, np.array([ids[pos]] * 2, dtype=np.int64), np.array([pos, pos]))
        steps.append(np.asarray(out, dtype=np.float32))
    return np.stack([np.asarray(chunked, dtype=np.float32), np.asarray(single, dtype=np.float32)]), np.stack(steps)


def max_diff(model: LoadedModel, ref: np.ndarray, ids: list[int], **kw: object) -> float:
    """Largest |our logit - reference logit| over the prefill and every decode step; `ref`: [T, V] for `ids`."""
    prefill, decode = our_logits(model, ids, **kw)
    diffs = [np.abs(prefill - ref[PROMPT - 1]).max()]
    diffs += [np.abs(decode[s] - ref[PROMPT + s]).max() for s in range(DECODE)]
    return float(max(diffs))
