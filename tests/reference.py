"""An independent, deliberately naive reference: a Llama forward in float64 numpy over the whole sequence.

No KV cache, no batching, no Paddle: every step recomputes everything from the HF-layout weights on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


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
