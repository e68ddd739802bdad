"""Baselines on paddleformers 1.2.0, on the same checkpoint and prompts, one request at a time.

    python -m bench.peers_paddle --model-dir DIR --out FILE.json --naive 64 128 256 --streamer 8 --new-tokens 64

naive     the "seed article's" loop: for every token, re-tokenize the full text, call
          model.generate(input_ids, max_new_tokens=1) (no KV cache reuse across tokens), decode the full
          sequence back to text. tokens/s per length.
streamer  paddleformers generate() with TextIteratorStreamer in a thread, consumed by the caller, as a user
          would serve requests one after another: `--streamer N` requests sequentially; aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import PROMPTS, quiet, summary, timed_streamer, write_json

quiet()

import paddle  # noqa: E402


def load(model_dir: Path) -> tuple[Any, Any]:
    from paddleformers.transformers import LlamaConfig, LlamaForCausalLM, Qwen2Tokenizer

    cfg = LlamaConfig.from_pretrained(str(model_dir))
    cfg.fuse_rms_norm = False  # the fused RMSNorm kernel is not registered for CPU in paddle 3.3.1
    model = LlamaForCausalLM.from_pretrained(str(model_dir), config=cfg, dtype="float32")
    model.eval()
    tok = Qwen2Tokenizer.from_pretrained(str(model_dir))
    return model, tok


def naive(model: Any, tok: Any, lengths: list[int]) -> dict[str, Any]:
    """The article's loop, written as its reader would; one run to the longest length.

    Every iteration starts from text alone, so the first 64 tokens of a 256-token run cost exactly what a 64-token
    run costs: tokens/s at each shorter length is read at that checkpoint of the same run.
    """
    text = PROMPTS[0]
    t0 = time.perf_counter()
    first = None
    produced = 0
    marks: dict[str, Any] = {}
    for _ in range(max(lengths)):
        input_ids = tok(text, return_tensors="pd")["input_ids"]  # re-tokenize everything
        out, _ = model.generate(input_ids=input_ids, max_new_tokens=1, decode_strategy="greedy_search")
        full = paddle.concat([input_ids, out], axis=-1)[0].numpy().tolist()
        text = tok.decode(full)  # and decode everything back to text
        produced += int(out.shape[-1])
        if first is None:
            first = time.perf_counter() - t0
        if produced in lengths:
            dt = time.perf_counter() - t0
            marks[str(produced)] = {"new_tokens": produced, "wall_s": dt, "tokens_per_s": produced / dt,
                                    "ttft_s": first, "prompt_tokens_at_end": len(full)}
    return marks


def streamed(model: Any, tok: Any, ids: list[int], n: int) -> dict[str, Any]:
    from paddleformers.generation import TextIteratorStreamer

    TimedStreamer = timed_streamer(TextIteratorStreamer)  # noqa: N806

    streamer = TimedStreamer(tok, skip_prompt=True, timeout=600)
    input_ids = paddle.to_tensor([ids], dtype="int64")
    result: dict[str, Any] = {}

    def run() -> None:
        with paddle.no_grad():
            out, _ = model.generate(input_ids=input_ids, max_new_tokens=n, decode_strategy="greedy_search",
                                    streamer=streamer)
        result["tokens"] = int(out.shape[-1])

    t0 = time.perf_counter()
    th = threading.Thread(target=run)
    th.start()
    first = None
    pieces = 0
    for piece in streamer:
        if first is None and piece:
            first = time.perf_counter() - t0
        pieces += 1
    th.join()
    dt = time.perf_counter() - t0
    token_ttft = streamer.put_times[1] - t0 if len(streamer.put_times) > 1 else None  # put #0 is the prompt
    return {"tokens": result.get("tokens", 0), "wall_s": dt, "ttft_s": token_ttft, "first_text_s": first,
            "pieces": pieces}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.peers_paddle")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--naive", type=int, nargs="*", default=[])
    p.add_argument("--streamer", type=int, default=0, help="requests served one after another")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    paddle.set_device("cpu")
    t = time.perf_counter()
    model, tok = load(Path(args.model_dir))
    result: dict[str, Any] = {"load_s": time.perf_counter() - t, "naive": {}, "streamer": None}
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))  # same prompt ids as the server's
    with paddle.no_grad():
        model.generate(input_ids=paddle.to_tensor([[1, 2, 3]]), max_new_tokens=2, decode_strategy="greedy_search")
    if args.naive:
        result["naive"] = naive(model, tok, sorted(set(args.naive)))
        write_json(args.out, result)
    if args.streamer:
        runs = []
        t0 = time.perf_counter()
        for i in range(args.streamer):
            ids = ours.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids
            runs.append(streamed(model, tok, ids, args.new_tokens))
        wall = time.perf_counter() - t0
        tokens = sum(r["tokens"] for r in runs)
        result["streamer"] = {"requests": args.streamer, "new_tokens": args.new_tokens, "tokens": tokens,
                              "wall_s": wall, "tokens_per_s": tokens / wall,
                              "ttft_ms": summary([r["ttft_s"] * 1e3 for r in runs if r["ttft_s"] is not None]),
                              "runs": runs}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
