"""One frozen config, built from CLI flags with TOKENSTREAM_* environment fallbacks, passed down."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_MODEL = "default"  # the trained demo model in models/tokenstream-demo
RANDOM_QWEN2_MODEL = "random-qwen2"  # a random-weight tiny Llama with the real Qwen2 tokenizer, built on first use


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = 50051
    model_dir: str = DEFAULT_MODEL
    model_cache: str = ""  # where built-in models are built; default ~/.cache/tokenstream/models
    device: str = "cpu"
    dtype: str = "float32"
    # Limits of a request
    max_new_tokens: int = 256  # default when a request leaves it unset
    max_new_tokens_limit: int = 2048  # largest a request may ask for
    max_request_ms: int = 120_000  # server-side maximum request time: ends a stream with TIME_LIMIT
    deadline_margin_ms: int = 50  # end gracefully this long (or two decode steps, if longer) before the deadline
    max_prompt_bytes: int = 65_536
    max_prompt_tokens: int = 0  # 0: whatever fits the context with one generated token
    max_stop_sequences: int = 8
    max_stop_sequence_chars: int = 256
    max_top_n: int = 10
    max_messages: int = 256
    max_metadata_bytes: int = 8192
    max_receive_message_bytes: int = 1_048_576
    # Engine
    max_slots: int = 32
    max_prefill_tokens: int = 256
    max_context: int = 2048
    max_queue: int = 64
    max_backlog: int = 256
    # sys.setswitchinterval. Measured (bench/): at Python's 5 ms the event loop's p99 lateness next to a batch-8
    # decode was no worse than at 1 ms, and batch-1 throughput was better, since Paddle ops release the GIL.
    switch_interval_ms: float = 5.0
    # Operations
    grace_s: float = 20.0  # drain time for in-flight streams after SIGTERM
    metrics_port: int = 0  # Prometheus exposition; 0 turns it off, -1 picks a free port
    watchdog_s: float = 30.0  # liveness fails when no engine step for this long while work is queued
    log_text: bool = False  # log prompts and outputs (off: privacy)
    debug_faults: bool = False  # let tests inject engine faults through request metadata
    # Security
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set to require client certificates (mTLS)
    auth_tokens_file: str = ""
    auth_tokens: str = ""  # comma-separated; prefer the file or the environment over a flag
    auth_reflection: bool = False  # whether reflection needs the bearer token too

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache) if self.model_cache else Path.home() / ".cache" / "tokenstream" / "models"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


_PARSERS: dict[type, Callable[[str], object]] = {bool: _parse_bool, int: int, float: float, str: str}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenstream-server",
        description="Stream LLM tokens over gRPC. Every flag falls back to TOKENSTREAM_<FLAG> in the environment.",
    )
    for f in fields(Config):
        kind = _PARSERS[type(f.default)]
        parser.add_argument(_flag(f.name), type=kind, default=None, help=f"(env TOKENSTREAM_{f.name.upper()}, "
                            f"default {f.default!r})")
    return parser


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags win over TOKENSTREAM_* variables, which win over the defaults."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    values = {}
    for f in fields(Config):
        kind = _PARSERS[type(f.default)]
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
        elif f"TOKENSTREAM_{f.name.upper()}" in env:
            values[f.name] = kind(env[f"TOKENSTREAM_{f.name.upper()}"])
    return Config(**values)
