"""Prefix reuse across requests (issue: "A conversation's next turn costs only its new tokens"): TTFT per turn of a
multi-turn chat with the prefix cache on and off, in one run, on SmolLM2-135M through the Engine in-process.

    python -m bench.levers.prefix_reuse [--turns 10] [--user-tokens 120] [--reply-tokens 30] [--json FILE]

Each turn's prompt is the previous prompt, its reply (exactly --reply-tokens, EOS suppressed) and a new user message;
the two engines alternate turn by turn so host noise falls on both alike. Also times the copy of the last turn's
reused positions into a slot against the prefill they save. Through the server, with several chats, callers sharing
a system prompt and llama-server's prompt cache beside it: bench/multiturn.py (`bench.run --only prefix`).
"""

from __future__ import annotations

import os

from bench.host import loadavg, mkl_for_amd

mkl_for_amd()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import engine_model_path, quiet  # noqa: E402
from service.engine.api import KV_BLOCK, EngineConfig  # noqa: E402
from service.engine.checkpoints.loader import load_model  # noqa: E402
from service.engine.kv_cache import SlotKVCache  # noqa: E402
from service.engine.prefix_cache import PrefixCache  # noqa: E402
from service.engine.scheduler import Engine  # noqa: E402
from service.engine.types import Chunk, GenerationRequest  # noqa: E402

TEXT = ("the river runs past old stone walls while children count boats and the baker sings about bread "
        "in a town where every window faces the sea and nobody ever hurries")
WORDS = TEXT.split()


def user_message(tokenizer: object, turn: int, tokens: int) -> list[int]:
    words = [WORDS[(turn * 7 + i) % len(WORDS)] for i in range(tokens * 2)]
    return tokenizer.encode(" " + " ".join(words))[:tokens]  # type: ignore[attr-defined]


def run_turn(engine: Engine, prompt: list[int], reply: int) -> tuple[list[int], Chunk]:
    chunks = list(engine.generate_sync(GenerationRequest(prompt, reply, min_new_tokens=reply, caller="bench")))
    return [t.id for c in chunks for t in c.tokens], chunks[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--user-tokens", type=int, default=120)
    ap.add_argument("--reply-tokens", type=int, default=30)
    ap.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M from its GGUF)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    quiet()
    model = load_model(args.model_dir or engine_model_path("smollm2"))
    base = EngineConfig(max_slots=4, max_context=min(2048, model.config.max_position_embeddings))
    engines = {"on": Engine(model, base), "off": Engine(model, EngineConfig(**{**base.__dict__, "prefix_cache_mb": 0}))}
    for eng in engines.values():
        eng.start()
    prompts = {name: user_message(model.tokenizer, 0, args.user_tokens) for name in engines}
    rows = []
    try:
        for turn in range(1, args.turns + 1):
            row: dict[str, float | int] = {"turn": turn}
            for name, eng in engines.items():
                ids, final = run_turn(eng, prompts[name], args.reply_tokens)
                assert final.timings is not None
                row["prompt_tokens"] = final.prompt_tokens
                row[f"ttft_{name}_ms"] = round(final.timings.ttft_ms, 1)
                row[f"cached_{name}"] = final.cached_prompt_tokens
                prompts[name] = prompts[name] + ids + user_message(model.tokenizer, turn, args.user_tokens)
            rows.append(row)
        same = prompts["on"] == prompts["off"]
    finally:
        for eng in engines.values():
            eng.stop()
    copy_ms = copy_cost(model, int(rows[-1]["cached_on"]))
    print(f"prefix reuse, {args.turns} turns, +{args.user_tokens} user / {args.reply_tokens} reply tokens a turn; "
          f"load {loadavg()}; token-identical on/off: {same}")
    print(f"{'turn':>4s} {'prompt':>6s} {'cached':>6s} {'TTFT on ms':>10s} {'TTFT off ms':>11s} {'on/off':>6s}")
    for r in rows:
        print(f"{r['turn']:4d} {r['prompt_tokens']:6d} {r['cached_on']:6d} {r['ttft_on_ms']:10.1f} "
              f"{r['ttft_off_ms']:11.1f} {r['ttft_on_ms'] / max(r['ttft_off_ms'], 1e-9):6.2f}")
    first, last = rows[0], rows[-1]
    print(f"last turn TTFT on / first turn TTFT on: {last['ttft_on_ms'] / max(first['ttft_on_ms'], 1e-9):.2f} "
          f"(goal <= 1.5); last turn on / off: {last['ttft_on_ms'] / max(last['ttft_off_ms'], 1e-9):.2f} "
          f"(goal <= 0.25)")
    print(f"copy of the last turn's {last['cached_on']} reused positions into a slot: {copy_ms:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "copy_ms": copy_ms, "token_identical": same, "block": KV_BLOCK}, f, indent=1)
    return 0


def copy_cost(model: object, positions: int, reps: int = 5) -> float:
    """Median ms to copy `positions` kept positions into a slot (the restore a hit costs)."""
    cfg = model.config  # type: ignore[attr-defined]
    positions = max(positions // KV_BLOCK, 1) * KV_BLOCK
    cache = SlotKVCache(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, positions, "float32")
    cache.ensure(positions, 1)
    store = PrefixCache(1 << 40, KV_BLOCK)
    tokens = np.arange(positions, dtype=np.int64)
    store.store(cache, 0, "", "", tokens)
    hit = store.lookup("", tokens, positions)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        store.restore(cache, 0, hit)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


if __name__ == "__main__":
    raise SystemExit(main())
