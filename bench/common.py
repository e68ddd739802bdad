"""Helpers shared by the benchmark processes: models, prompts, statistics, JSON output.

This module stays light (no Paddle, no gRPC at import) so the orchestrator and the load generator start fast.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = BENCH_ENV["PYTHONPATH"] + os.pathsep + os.environ["PYTHONPATH"]
    return env


@dataclass(frozen=True)
class BenchModel:
    key: str  # "tiny" or "base"
    spec_name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# TINY is the server's default model; BASE is the headline model (hidden 768, 12 layers, GQA 12/4).
MODELS = {
    "tiny": BenchModel("tiny", "tiny-random-llama-qwen2tok", 256, 4, 4, 2, 688),
    "base": BenchModel("base", "bench-base-random-llama-qwen2tok", 768, 12, 12, 4, 2048),
}


def model_dir(key: str) -> Path:
    """Build (first time only, ~30 s for base) and return the model's directory in the shared model cache."""
    from service.engine.default_model import TINY, RandomModelSpec, default_cache_root, ensure_random_model

    m = MODELS[key]
    spec = TINY if key == "tiny" else RandomModelSpec(
        m.spec_name, m.hidden_size, m.num_layers, m.num_heads, m.num_kv_heads, m.intermediate_size
    )
    assert spec.name == m.spec_name
    return ensure_random_model(spec, default_cache_root())


def param_counts(key: str, vocab: int = 151936) -> dict[str, int]:
    m = MODELS[key]
    d = m.hidden_size // m.num_heads
    per_layer = (
        m.hidden_size * m.hidden_size * 2  # q, o
        + 2 * m.hidden_size * m.num_kv_heads * d  # k, v
        + 3 * m.hidden_size * m.intermediate_size  # gate, up, down
        + 2 * m.hidden_size  # norms
    )
    layers = per_layer * m.num_layers
    embed = vocab * m.hidden_size
    return {"layers": layers, "embedding_tied": embed, "total": layers + embed + m.hidden_size}


# Fixed prompts (short, plain English), cycled across streams. Same prompts for every system compared.
PROMPTS = [
    "The history of the printing press begins in",
    "Write a short story about a lighthouse keeper who",
    "Explain in simple words how a refrigerator keeps food",
    "A good recipe for a rainy afternoon is",
    "The three most important ideas in computer networking are",
    "Once upon a time, in a village by the sea,",
    "Here is a list of tips for learning a new language:",
    "The train left the station at dawn and",
]


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
