"""Optional fused kernels are proven in a child process, and the plain ones serve wherever they are not.

A Paddle kernel built for AVX-512 kills the process by SIGILL on a CPU without it. These tests run on every machine:
the probe machinery with probes that die by SIGILL or answer wrongly (tests/support/kernels.py), a real server whose
probe dies by SIGILL (it still serves, on the plain RMSNorm), and the plain kernels against the fused ones on the
real SmolLM2 where this CPU runs the fused ones (skipped elsewhere, naming the missing CPU flag).
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.engine import kernels
from service.engine.checkpoints.loader import LoadedModel, load_model
from service.engine.decoder import DecoderOptions, LlamaDecoder, PrefillChunk
from service.engine.kernels import Kernels, choose
from service.engine.kv_cache import SlotKVCache
from tests.gguf_files import smollm2_file
from tests.support.servers import Subprocess, wait_serving
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

SIGILL_PROBE = "tests.support.kernels:die_by_sigill"
WRONG_PROBE = "tests.support.kernels:wrong_answer"
PASSING_PROBE = "tests.support.kernels:passes"


# -- the probe ------------------------------------------------------------------------------------


def test_a_probe_killed_by_sigill_selects_the_plain_kernel_and_the_verdict_is_cached(tmp_path: Path) -> None:
    cache = tmp_path / "kernels.json"
    probes = {"fused_rms_norm": SIGILL_PROBE, "swiglu": PASSING_PROBE}
    first = choose("auto", cache, probes)
    assert first["fused_rms_norm"].fused is False
    assert "killed by SIGILL" in first["fused_rms_norm"].reason
    assert first["swiglu"].fused is True  # one kernel's crash costs no other its fast path
    assert Kernels.from_choices(first) == Kernels(fused_rms_norm=False, swiglu=True)
    stored = json.loads(cache.read_text())
    assert {e["kernel"]: e["fused"] for e in stored.values()} == {"fused_rms_norm": False, "swiglu": True}
    # The second start reads the verdicts: no child runs (a probe that would now pass is not asked).
    again = choose("auto", cache, probes)
    assert "cached" in again["fused_rms_norm"].reason
    assert again["fused_rms_norm"].fused is False


def test_a_wrong_answer_selects_the_plain_kernel_and_says_why(tmp_path: Path) -> None:
    got = choose("auto", tmp_path / "k.json", {"fused_rms_norm": WRONG_PROBE})["fused_rms_norm"]
    assert got.fused is False
    assert "max |error| 0.5" in got.reason


def test_plain_mode_runs_no_probe(tmp_path: Path) -> None:
    cache = tmp_path / "k.json"
    got = choose("plain", cache, {"fused_rms_norm": PASSING_PROBE})
    assert got["fused_rms_norm"].fused is False
    assert "--kernels plain" in got["fused_rms_norm"].reason
    assert not cache.exists()
    with pytest.raises(ValueError, match="kernels: 'fast' is not one of auto, plain"):
        choose("fast", cache)


def test_the_verdict_is_keyed_by_the_cpu_flags_and_the_paddle_build(monkeypatch: pytest.MonkeyPatch) -> None:
    key = kernels.cache_key(PASSING_PROBE)
    assert kernels.cache_key(SIGILL_PROBE) != key
    monkeypatch.setattr(kernels, "cpu_flags", lambda: ["avx", "avx2", "fma"])
    avx2_only = kernels.cache_key(PASSING_PROBE)
    assert avx2_only != key
    monkeypatch.setattr(kernels, "_paddle_build", lambda: "9.9.9+other")
    assert kernels.cache_key(PASSING_PROBE) != avx2_only


def test_the_real_probes_give_a_verdict_here(tmp_path: Path) -> None:
    """The real probes run in children; whatever this CPU can do, the verdict comes back and this process lives."""
    got = choose("auto", tmp_path / "k.json")
    assert set(got) == {"fused_rms_norm", "swiglu"}
    for choice in got.values():
        assert choice.reason
        if not choice.fused:
            print(f"\n{choice.name}: plain here ({choice.reason})")
    if "avx512f" not in kernels.cpu_flags():
        assert got["fused_rms_norm"].fused is False, "Paddle's fused_rms_norm needs AVX-512 on CPU"


def test_the_server_serves_when_the_fused_kernel_dies_by_sigill(model_dir: Path, tmp_path: Path) -> None:
    """As on an AVX2-only CPU: the probe of fused_rms_norm dies by SIGILL in its child; the server logs the plain
    choice and why, reaches SERVING and streams."""
    server = Subprocess("--probe", f"fused_rms_norm={SIGILL_PROBE}", "--kernel-cache", str(tmp_path / "k.json"),
                        "--model-dir", str(model_dir), "--max-context", "512", "--port", "0")
    target = f"127.0.0.1:{server.port}"
    try:
        wait_serving(target)
        with grpc.insecure_channel(target) as ch:
            msgs = list(pb_grpc.GenerationServiceStub(ch).Generate(pb.GenerateRequest(
                prompt="hello", stopping=pb.StoppingCriteria(max_new_tokens=8)), timeout=120))
        assert sum(len(m.tokens) for m in msgs) == 8
        assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
        choices = [json.loads(line) for line in server.log if line.startswith("{") and '"kernel"' in line]
        rms = [c for c in choices if c.get("kernel") == "fused_rms_norm"]
        assert rms, "".join(server.log[-20:])
        assert rms[0]["fused"] is False
        assert "killed by SIGILL" in rms[0]["msg"]
    finally:
        assert server.stop() == 0


# -- plain and fused kernels give the same model ------------------------------------------------------

CHATS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a KV cache is."]
STEPS = 64
# float32's own floor here: the same kernels give logits 4-6e-5 apart at batch 1 and batch 3 (MKL blocks the matmuls
# differently), and a plain RMSNorm with a float64 mean is 5e-5 from the fused one, so 1e-5 cannot separate right
# from wrong. The bound is the README's for our GGUF logits against transformers'; measured: 9.3e-5.
LOGIT_TOL = 1.5e-4


@pytest.fixture(scope="module")
def smollm2_model() -> LoadedModel:
    return load_model(smollm2_file())


def fused_here() -> Kernels:
    choices = choose("auto")
    rms = choices["fused_rms_norm"]
    if not rms.fused:
        missing = "" if "avx512f" in kernels.cpu_flags() else "this CPU has no avx512f; "
        pytest.skip(f"{missing}the fused RMSNorm does not run here ({rms.reason})")
    return Kernels.from_choices(choices)


def greedy_run(model: LoadedModel, decoder: LlamaDecoder) -> tuple[list[list[int]], list[np.ndarray]]:
    """3 chat prompts prefilled in one step, then STEPS batched greedy decode steps: (tokens per row, logits per
    step [3, V])."""
    cfg = model.config
    prompts = [np.array(model.tokenizer.encode_chat([{"role": "user", "content": c}]), dtype=np.int64)
               for c in CHATS]
    cache = SlotKVCache(cfg.num_layers, 4, cfg.num_kv_heads, cfg.head_dim, 512, "float32")
    cache.ensure(max(len(p) for p in prompts) + STEPS + 1, len(prompts))
    _, firsts = decoder.step(cache, np.zeros(0, np.int64), np.zeros(0, np.int64),
                             [PrefillChunk(i, p, 0, True) for i, p in enumerate(prompts)])
    tokens = np.array([int(np.argmax(f)) for f in firsts], dtype=np.int64)
    positions = np.array([len(p) for p in prompts], dtype=np.int64)
    out, all_logits = [[int(t)] for t in tokens], [np.stack(firsts)]
    for _ in range(STEPS - 1):
        logits = decoder.decode_step(cache, tokens, positions)
        all_logits.append(logits)
        tokens, positions = logits.argmax(-1).astype(np.int64), positions + 1
        for row, t in zip(out, tokens, strict=True):
            row.append(int(t))
    return out, all_logits


def test_fused_and_plain_kernels_agree_on_smollm2(smollm2_model: LoadedModel) -> None:
    fused = fused_here()
    cfg, w = smollm2_model.config, smollm2_model.weights
    plain_tokens, plain_logits = greedy_run(smollm2_model, LlamaDecoder(cfg, w, 512, "float32", kernels=Kernels()))
    fused_tokens, fused_logits = greedy_run(smollm2_model, LlamaDecoder(cfg, w, 512, "float32", kernels=fused))
    assert fused_tokens == plain_tokens  # the same 64 greedy tokens for each prompt
    worst = max(float(np.abs(a - b).max()) for a, b in zip(plain_logits, fused_logits, strict=True))
    print(f"\nfused {fused} against plain: max |logit diff| {worst:.2e} over {STEPS} steps of 3 rows")
    assert float(np.abs(plain_logits[0]).max()) > 5.0, "logits too flat to tell kernels apart"
    assert worst < LOGIT_TOL


def test_the_setting_takes_auto_or_plain_from_a_flag_or_the_environment() -> None:
    from service.config import load_config

    assert load_config([], env={}).engine.kernels == "auto"
    assert load_config(["--kernels", "plain"], env={}).engine.kernels == "plain"
    assert load_config([], env={"TOKENSTREAM_KERNELS": "plain"}).engine.kernels == "plain"
    with pytest.raises(SystemExit, match="TOKENSTREAM_KERNELS: 'fused' is not one of auto, plain"):
        load_config([], env={"TOKENSTREAM_KERNELS": "fused"})
    with pytest.raises(SystemExit):  # argparse names the flag and its choices on stderr
        load_config(["--kernels", "fused"], env={})


def test_two_decode_threads_and_one_agree_on_smollm2(smollm2_model: LoadedModel) -> None:
    """The engine's default (--decode-threads 0: two threads on two CPUs) against one: MKL splits the matmuls
    differently, which may move the last bits, never a greedy token of these chats."""
    cfg, w = smollm2_model.config, smollm2_model.weights
    one = greedy_run(smollm2_model, LlamaDecoder(cfg, w, 512, "float32", options=DecoderOptions(threads=1)))
    two = greedy_run(smollm2_model, LlamaDecoder(cfg, w, 512, "float32", options=DecoderOptions(threads=2)))
    assert two[0] == one[0]
    worst = max(float(np.abs(a - b).max()) for a, b in zip(one[1], two[1], strict=True))
    print(f"\n2 threads against 1: max |logit diff| {worst:.2e} over {STEPS} steps of 3 rows")
    assert worst < LOGIT_TOL
