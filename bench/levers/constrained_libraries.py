"""The choice of constraint library, checked: llguidance (what the engine uses) against outlines-core 0.2.14, on
the same model vocabulary and the same JSON schema (bench.levers.constrained's TYPICAL order).

    python -m bench.levers.constrained_libraries [--model-dir DIR] [--reps 5] [--json FILE]

For each library: the time to compile the schema for this vocabulary (outlines-core: the schema's regex, then its
token index over the whole vocabulary; llguidance: validate and build the matcher, its tokenizer built once per
model and timed apart, as the engine caches it), and the time per next-token mask along one valid document
(tokenized once, masks asked for at each of its tokens). Medians.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import llguidance.numpy as llg_numpy
import numpy as np

from bench.common import engine_model_path, quiet
from bench.host import loadavg
from bench.levers.constrained import TYPICAL
from service.engine.checkpoints.loader import load_model
from service.engine.constraints import compile_constraint, ll_tokenizer

DOCUMENT = {"id": "ORD-123456", "customer": {"name": "Ada"}, "items": [{"sku": "A1", "qty": 2}], "status": "paid"}


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def llguidance_figures(model: Any, ids: list[int], reps: int) -> dict[str, Any]:
    cfg, tok = model.config, model.tokenizer
    build_s, ll_tok = timed(lambda: ll_tokenizer(tok, cfg.vocab_size, cfg.eos_token_ids))
    compiles = [timed(lambda: compile_constraint("json_schema", TYPICAL, ll_tok))[0] for _ in range(reps)]
    compiled = compile_constraint("json_schema", TYPICAL, ll_tok)
    bits = llg_numpy.allocate_token_bitmask(1, cfg.vocab_size)
    per_mask = []
    for _ in range(reps):
        matcher = compiled.start()
        for token in ids:
            t = time.perf_counter()
            llg_numpy.fill_next_token_bitmask(matcher, bits, 0)
            per_mask.append(time.perf_counter() - t)
            assert matcher.consume_token(token), "the document must follow the schema"
    return {"tokenizer_build_ms": build_s * 1e3, "compile_ms_p50": float(np.median(compiles)) * 1e3,
            "mask_us_p50": float(np.median(per_mask)) * 1e6}


def outlines_figures(model: Any, ids: list[int], reps: int) -> dict[str, Any]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    cfg, tok = model.config, model.tokenizer
    eos = cfg.eos_token_ids[0]
    pieces: dict[bytes, list[int]] = {}
    for i in range(tok.vocab_size):
        piece = tok.token_bytes(i)
        if piece is not None and i not in cfg.eos_token_ids:
            pieces.setdefault(piece, []).append(i)
    build_s, vocab = timed(lambda: Vocabulary(eos, pieces))
    regex = build_regex_from_schema(json.dumps(TYPICAL))
    compiles, index = [], None
    for _ in range(reps):
        seconds, index = timed(lambda: Index(regex, vocab))
        compiles.append(seconds)
    per_mask = []
    for _ in range(reps):
        guide = Guide(index)
        for token in ids:
            t = time.perf_counter()
            guide.get_tokens()
            per_mask.append(time.perf_counter() - t)
            guide.advance(token)
    return {"vocabulary_build_ms": build_s * 1e3, "regex_chars": len(regex),
            "compile_ms_p50": float(np.median(compiles)) * 1e3, "mask_us_p50": float(np.median(per_mask)) * 1e6}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", help="checkpoint (default: SmolLM2-135M from its GGUF)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    quiet()
    model = load_model(Path(args.model_dir) if args.model_dir else engine_model_path("smollm2"))
    # The document in the layout the engine's JSON grammar writes (", " and ": "), which outlines' regex allows.
    ids = model.tokenizer.encode(json.dumps(DOCUMENT))
    out: dict[str, Any] = {"load_start": loadavg(), "vocab_size": model.config.vocab_size, "document_tokens": len(ids)}
    out["llguidance"] = llguidance_figures(model, ids, args.reps)
    try:
        out["outlines_core"] = outlines_figures(model, ids, args.reps)
    except ImportError:
        out["outlines_core"] = None
        print("outlines-core is not installed (the dev extra has it): only llguidance measured")
    for name, res in (("llguidance", out["llguidance"]), ("outlines-core", out["outlines_core"])):
        if res:
            print(f"{name:14s} compile {res['compile_ms_p50']:9.1f} ms   mask {res['mask_us_p50']:8.1f} us/token")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
