"""Optional peer: Hugging Face transformers + PyTorch CPU, TextIteratorStreamer, one request at a time.

    python -m bench.peers_hf --model-dir DIR --out FILE.json --streamer 8 --new-tokens 64

The checkpoint is HF Llama layout already, so LlamaForCausalLM.from_pretrained(dir) loads the same weights.
"""

from __future__ import annotations

import sys

# paddlecodec ships a `torchcodec` module without package metadata, which breaks transformers 5.3's
# audio_utils import; hiding it (find_spec then returns None) is enough for a text model.
sys.modules.setdefault("torchcodec", None)  # type: ignore[arg-type]

import argparse  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import PROMPTS, quiet, summary, timed_streamer, write_json  # noqa: E402

quiet()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.peers_hf")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--streamer", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, TextIteratorStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    load_s = time.perf_counter() - t
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(Path(args.model_dir) / "tokenizer.json"))
    eos = tok.eos_token_id

    TimedStreamer = timed_streamer(TextIteratorStreamer)  # noqa: N806

    def one(ids: list[int], n: int) -> dict[str, Any]:
        streamer = TimedStreamer(tok, skip_prompt=True, timeout=600)
        input_ids = torch.tensor([ids], dtype=torch.long)
        res: dict[str, Any] = {}

        def run() -> None:
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                     max_new_tokens=n, do_sample=False, streamer=streamer, pad_token_id=eos)
            res["tokens"] = int(out.shape[-1] - input_ids.shape[-1])

        t0 = time.perf_counter()
        th = threading.Thread(target=run)
        th.start()
        first = None
        for piece in streamer:
            if first is None and piece:
                first = time.perf_counter() - t0
        th.join()
        token_ttft = streamer.put_times[1] - t0 if len(streamer.put_times) > 1 else None  # put #0: the prompt
        return {"tokens": res.get("tokens", 0), "wall_s": time.perf_counter() - t0, "ttft_s": token_ttft,
                "first_text_s": first}

    one(ours.encode(PROMPTS[0], add_special_tokens=False).ids, 2)  # warm-up
    runs = []
    t0 = time.perf_counter()
    for i in range(args.streamer):
        runs.append(one(ours.encode(PROMPTS[i % len(PROMPTS)], add_special_tokens=False).ids, args.new_tokens))
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in runs)
    write_json(args.out, {
        "load_s": load_s, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "streamer": {"requests": args.streamer, "new_tokens": args.new_tokens, "tokens": tokens, "wall_s": wall,
                     "tokens_per_s": tokens / wall,
                     "ttft_ms": summary([r["ttft_s"] * 1e3 for r in runs if r["ttft_s"] is not None]),
                     "runs": runs},
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
