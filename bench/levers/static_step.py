"""Lever tried and dropped (bench/PROFILE.md): the decode step as one static Paddle program run by Paddle Inference.

Kept here so that `python -m bench.profile_step --paths fast,static1,static2` can measure it again. The idea: a
SmolLM2-sized decode step is ~1,500 small Paddle ops, each paying dispatch; exported once with
`paddle.jit.to_static` and run by a Paddle Inference predictor, the step is one `run()`. Measured, the predictor's
executor costs more per op than dygraph on this CPU, and its oneDNN passes changed the results.

What the program takes and gives (shapes: B rows, L layers, kv heads, d head_dim, cap cache capacity, H hidden):
  inputs   tokens [B] int64, positions [B] int64, per layer K and V caches [B, kv, cap, d] (views of the slot cache,
           shared with the predictor without a copy), and every weight (shared once, without a copy, so Paddle
           Inference holds no second copy of the model).
  outputs  the final-normed hidden state [B, H] (the lm_head runs outside, see model.py) and each layer's new K
           and V rows [L, B, kv, d].
The program never writes the cache: a static program cannot write into its inputs (PIR drops in-place updates of
feeds). Each row attends to its cached positions 0..pos-1 (masked over the capacity) and to its own new K/V,
softmaxed together; that is the same attention as writing K/V first, and the caller then writes the new rows in
place with one scatter per K and V for all layers (SlotKVCache.write_all).
"""

from __future__ import annotations

import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle.incubate.nn.functional import fused_rms_norm
from paddle.static import InputSpec

from service.engine.checkpoints.model_config import ModelConfig

log = logging.getLogger("tokenstream.static_step")

MASKED = -1e30
LAYER_WEIGHTS = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")


class _DecodeProgram(paddle.nn.Layer):
    """The forward of model.LlamaDecoder.decode_step, written for export: no Python state, no in-place writes."""

    def __init__(self, cfg: ModelConfig, has_bias: bool, with_lm_head: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.has_bias = has_bias
        self.with_lm_head = with_lm_head
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(  # type: ignore[no-untyped-def]
        self, tokens, positions, k_caches, v_caches, weights, biases, embed, norm, cos_table, sin_table, lm_head
    ):
        cfg = self.cfg
        nh, kv, g, d = cfg.num_heads, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
        eps = cfg.rms_norm_eps
        cos = paddle.gather(cos_table, positions).unsqueeze(1)  # [B, 1, d]
        sin = paddle.gather(sin_table, positions).unsqueeze(1)  # [B, 1, d], sign-folded: see rope_tables
        cap = paddle.shape(k_caches[0])[2]
        keys = paddle.arange(cap, dtype="int64").unsqueeze(0)  # [1, cap]
        # Cached positions 0..pos-1 only: the row's own K/V are not in the cache yet.
        mask = paddle.where(keys < positions.unsqueeze(1), 0.0, MASKED).astype(cos.dtype)  # [B, cap]
        mask = mask.unsqueeze(1).unsqueeze(1)  # [B, 1, 1, cap]
        x = paddle.gather(embed, tokens)  # [B, H], the residual stream
        h = fused_rms_norm(x, weights[0][0], None, eps, 1)[0]
        new_k, new_v = [], []
        for i in range(cfg.num_layers):
            _, w_qkv, w_o, w_post, w_gu, w_down = weights[i]
            qkv = paddle.matmul(h, w_qkv)  # [B, (nh + 2 kv) d]
            if self.has_bias:
                qkv = qkv + biases[i]
            qk, v = paddle.split(qkv, [(nh + kv) * d, kv * d], axis=-1)
            qk = qk.reshape([-1, nh + kv, d])
            # RoPE on q and k at once; rotate-half is a roll by d/2 with the sign folded into the sin table.
            qk = qk * cos + paddle.roll(qk, d // 2, axis=-1) * sin
            q, k = paddle.split(qk, [nh, kv], axis=1)
            v = v.reshape([-1, kv, d])
            new_k.append(k)
            new_v.append(v)
            qg = q.reshape([-1, kv, g, d]) * self.scale  # queries grouped under their kv head
            s_cached = paddle.matmul(qg, k_caches[i], transpose_y=True) + mask  # [B, kv, g, cap]
            s_self = paddle.matmul(qg, k.unsqueeze(-1))  # [B, kv, g, 1]
            probs = F.softmax(paddle.concat([s_cached, s_self], axis=-1), axis=-1)
            p_cached, p_self = paddle.split(probs, [cap, 1], axis=-1)
            out = paddle.matmul(p_cached, v_caches[i]) + p_self * v.unsqueeze(2)  # [B, kv, g, d]
            # fused_rms_norm adds the residual first: h = norm(x + a), x = x + a, in one op.
            h, x = fused_rms_norm(paddle.matmul(out.reshape([-1, nh * d]), w_o), w_post, None, eps, 1, residual=x)
            m = paddle.matmul(F.swiglu(paddle.matmul(h, w_gu)), w_down)
            w_next = weights[i + 1][0] if i + 1 < cfg.num_layers else norm
            h, x = fused_rms_norm(m, w_next, None, eps, 1, residual=x)
        if self.with_lm_head:
            h = paddle.matmul(h, lm_head)  # [B, V]
        return h, paddle.stack(new_k), paddle.stack(new_v)


def rope_tables(cos: paddle.Tensor, sin: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """cos and sin [T, d] for rotate-half RoPE as a roll: x cos + roll(x, d/2) sin', sin' = [-sin_lo, sin_hi]."""
    half = sin.shape[-1] // 2
    return cos, paddle.concat([-sin[:, :half], sin[:, half:]], axis=-1)


def _flat_weights(weights: Any) -> tuple[list[list[paddle.Tensor]], list[paddle.Tensor]]:
    per_layer = [[getattr(layer, n) for n in LAYER_WEIGHTS] for layer in weights.layers]
    biases = [layer.qkv_bias for layer in weights.layers if layer.qkv_bias is not None]
    return per_layer, biases


class StaticDecodeStep:
    """Builds the program once per decoder, then runs a decode step with one predictor call."""

    def __init__(self, cfg: ModelConfig, weights: Any, cos: paddle.Tensor, sin: paddle.Tensor,
                 threads: int = 0, with_lm_head: bool = False) -> None:
        self.cfg = cfg
        per_layer, biases = _flat_weights(weights)
        cos, sin = rope_tables(cos, sin)
        has_bias = bool(biases)
        if has_bias and len(biases) != cfg.num_layers:
            raise ValueError("either every layer or none has a qkv bias")
        program = _DecodeProgram(cfg, has_bias, with_lm_head)
        self.with_lm_head = with_lm_head
        kv, d = cfg.num_kv_heads, cfg.head_dim

        def spec(t: paddle.Tensor, name: str) -> InputSpec:
            return InputSpec(list(t.shape), t.dtype, name=name)

        w_spec = [[spec(t, f"w{i}_{n}") for t, n in zip(ws, LAYER_WEIGHTS, strict=True)]
                  for i, ws in enumerate(per_layer)]
        b_spec = [spec(b, f"b{i}") for i, b in enumerate(biases)]
        cache_spec = [[InputSpec([None, kv, None, d], cos.dtype, name=f"{kind}{i}") for i in range(cfg.num_layers)]
                      for kind in ("k", "v")]
        specs: list[Any] = [InputSpec([None], "int64", name="tokens"), InputSpec([None], "int64", name="positions"),
                 cache_spec[0], cache_spec[1], w_spec, b_spec, spec(weights.embed, "embed"),
                 spec(weights.norm, "norm"), spec(cos, "cos"), spec(sin, "sin"),
                 spec(weights.lm_head, "lm_head") if with_lm_head else None]
        static = paddle.jit.to_static(program, input_spec=specs, full_graph=True)
        with tempfile.TemporaryDirectory(prefix="tokenstream-step-") as tmp:
            path = str(Path(tmp) / "decode")
            paddle.jit.save(static, path)
            model_file = path + ".json" if Path(path + ".json").exists() else path + ".pdmodel"
            config = paddle.inference.Config(model_file, path + ".pdiparams")
            config.disable_gpu()
            config.disable_onednn()  # its CPU passes changed the results here (bench/PROFILE.md)
            config.switch_ir_optim(True)
            config.disable_glog_info()
            if threads:
                config.set_cpu_math_library_num_threads(threads)
            self.predictor = paddle.inference.create_predictor(config)
        handles = {n: self.predictor.get_input_handle(n) for n in self.predictor.get_input_names()}
        # The weights are bound once: the predictor reads Paddle's own tensors, no copy is made.
        self._keep = [weights.embed, weights.norm, cos, sin, *biases, *(t for ws in per_layer for t in ws)]
        for ws_spec, ws in zip(w_spec, per_layer, strict=True):
            for s, t in zip(ws_spec, ws, strict=True):
                handles[str(s.name)].share_external_data(t)
        for s, t in zip(b_spec, biases, strict=True):
            handles[str(s.name)].share_external_data(t)
        shared = [("embed", weights.embed), ("norm", weights.norm), ("cos", cos), ("sin", sin)]
        if with_lm_head:
            shared.append(("lm_head", weights.lm_head))
        for name, t in shared:
            handles[name].share_external_data(t)
        self._tokens = handles["tokens"]
        self._positions = handles["positions"]
        self._k = [handles[f"k{i}"] for i in range(cfg.num_layers)]
        self._v = [handles[f"v{i}"] for i in range(cfg.num_layers)]
        outs = self.predictor.get_output_names()
        self._out = [self.predictor.get_output_handle(n) for n in outs]
        self.bound: tuple[Any, ...] = ()

    def bind_cache(self, k_views: list[paddle.Tensor], v_views: list[paddle.Tensor], key: tuple[Any, ...]) -> None:
        """Point the predictor at the active rows of the cache; `key` names them (rebind when it changes)."""
        for hd, t in zip(self._k, k_views, strict=True):
            hd.share_external_data(t)
        for hd, t in zip(self._v, v_views, strict=True):
            hd.share_external_data(t)
        self.bound = key
        self._views = (k_views, v_views)  # the predictor holds raw pointers: keep the views alive

    def run(self, tokens: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(final hidden [B, H], new K [L, B, kv, d], new V [L, B, kv, d]), as host arrays."""
        self._tokens.copy_from_cpu(np.ascontiguousarray(tokens, dtype=np.int64))
        self._positions.copy_from_cpu(np.ascontiguousarray(positions, dtype=np.int64))
        self.predictor.run()
        h, k, v = (o.copy_to_cpu() for o in self._out)
        return h, k, v


def static_decode_path(model: Any, dec: Any, **options: Any) -> Any:
    """A decode_step(cache, tokens, positions) -> logits [B, V] that runs the program above, for the profile."""
    cfg = model.config
    from bench.revisions import unsplit

    st = StaticDecodeStep(cfg, unsplit(model.weights), dec.cos, dec.sin, **options)  # the program reads gate_up
    d = cfg.head_dim

    def step(cache: Any, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        b = int(tokens.shape[0])
        key = (b, cache, cache.generation)
        if key != st.bound:
            views = [cache.active(i, b) for i in range(cfg.num_layers)]
            st.bind_cache([k for k, _ in views], [v for _, v in views], key)
        h, k, v = st.run(tokens, positions)  # [B, H] (or [B, V]), [L, B, kv, d] x 2
        # All layers' new rows in one scatter per K and V, into the all-layer storage of the slot cache.
        per_layer = cache.max_slots * cache.kv_heads * cache.capacity
        rows = (np.arange(cfg.num_layers, dtype=np.int64)[:, None] * per_layer
                + cache.flat_rows_np(positions)[None, :]).reshape(-1)
        index = paddle.to_tensor(rows)
        cache._k_all.reshape([-1, d]).scatter_(index, paddle.to_tensor(k.reshape(-1, d)))
        cache._v_all.reshape([-1, d]).scatter_(index, paddle.to_tensor(v.reshape(-1, d)))
        return h if st.with_lm_head else h @ dec._host_lm_head

    return step
