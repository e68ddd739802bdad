"""Peer: Hugging Face transformers + PyTorch CPU, `generate()` on a fixed, left-padded batch.

    python -m bench.peers_hf --model-dir DIR --out FILE.json --batches 1 4 8 16 32 --new-tokens 128

The model directory is the one our engine loads (HF Llama layout), so the weights are the same. Prompts are the
token ids of bench.common.PROMPTS by that directory's tokenizer.json, cycled over the batch; greedy, with
min_new_tokens = max_new_tokens so every row generates exactly that many tokens. torch uses every core.
Timing comes from a logits processor that stamps each decoding step: TTFT is the first step (prefill included),
the inter-token latency each later step's gap (one token per row per step).
"""

from __future__ import annotations

import sys

# paddlecodec ships a `torchcodec` module without package metadata, which breaks transformers 5.3's
# audio_utils import; hiding it (find_spec then returns None) is enough for a text model.
sys.modules.setdefault("torchcodec", None)  # type: ignore[arg-type]

import argparse  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from bench.common import CpuMeter, encode_prompts, quiet, summary, wait_idle, write_json  # noqa: E402

quiet()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.peers_hf")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4, 8, 16, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)

    import torch
    import transformers
    from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    prompts = encode_prompts(Path(args.model_dir))
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    pad = pad[0] if isinstance(pad, list) else pad

    class StepClock(LogitsProcessor):
        """Stamps the time each step's logits are ready; changes nothing."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            self.times.append(time.perf_counter())
            return scores

    def run(b: int, n: int) -> dict[str, Any]:
        rows = [prompts[i % len(prompts)] for i in range(b)]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)  # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        clock = StepClock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=pad, logits_processor=LogitsProcessorList([clock]))
        wall = time.perf_counter() - t0
        new = out[:, width:].tolist()
        tokens = sum(len(r) for r in new)
        gaps = [(b2 - a) * 1e3 for a, b2 in zip(clock.times, clock.times[1:], strict=False)]
        return {"batch": b, "new_tokens": n, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                "ttft_ms": summary([(clock.times[0] - t0) * 1e3] if clock.times else []),
                "itl_ms": summary(gaps), "step_ms_p50": summary(gaps)["p50"],
                "outputs": [{"prompt": i % len(prompts), "ids": r} for i, r in enumerate(new)]}

    result: dict[str, Any] = {"load_s": load_s, "torch": torch.__version__.split("+")[0],
                              "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                              "prompt_tokens": [len(x) for x in prompts], "batches": {}}
    for b in args.batches:
        run(b, 2)  # warm this shape
        idle = wait_idle()
        meter = CpuMeter([])
        r = run(b, args.new_tokens)
        r["idle"], r["during"] = idle, meter.stop()
        result["batches"][str(b)] = r
        write_json(args.out, result)  # partial results survive a later failure
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
