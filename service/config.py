"""One frozen config, built from CLI flags with TOKENSTREAM_* environment fallbacks, passed down."""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path

from service.engine.api import EngineConfig, check_bounds, default_model_cache, setting


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = setting(50051, at_least=0, at_most=65535)
    # A registered name (`python -m service.models list`), or a checkpoint: a directory in the Hugging Face or
    # PaddleFormers layout, a .gguf file, or a directory holding one .gguf (dequantized to float32 at load, with a
    # float32 cache written next to it, or under ~/.cache/tokenstream/gguf where that is read-only), or
    # hf:ORG/NAME to fetch one from the Hugging Face Hub (only with that prefix, and only when networking is on).
    model_dir: str = "default"
    model_cache: str = ""  # where named models live; default $XDG_CACHE_HOME/tokenstream/models
    # Load `.pdparams` weights, which are pickles: unpickling runs any code the file carries, so only for files
    # whose origin you trust. Off, such a checkpoint is refused before a byte of it is unpickled.
    trust_pickle: bool = False
    # Limits of a request
    max_new_tokens: int = setting(256, at_least=1)  # default when a request leaves it unset
    max_new_tokens_limit: int = setting(2048, at_least=1)  # largest a request may ask for (capped by the context)
    # server-side maximum request time: ends a stream with TIME_LIMIT
    max_request_ms: int = setting(120_000, at_least=1)
    # end gracefully this long (or two decode steps, if longer) before the deadline
    deadline_margin_ms: int = setting(50, at_least=0)
    max_prompt_bytes: int = setting(65_536, at_least=1)
    max_prompt_tokens: int = setting(0, at_least=0)  # 0: whatever fits the context with one generated token
    max_stop_sequences: int = setting(8, at_least=0)
    max_stop_sequence_chars: int = setting(256, at_least=1)
    max_top_n: int = setting(10, at_least=0)
    max_messages: int = setting(256, at_least=1)
    max_metadata_bytes: int = setting(8192, at_least=1)
    max_receive_message_bytes: int = setting(1_048_576, at_least=1)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # sys.setswitchinterval. Measured (bench/): at Python's 5 ms the event loop's p99 lateness next to a batch-8
    # decode was no worse than at 1 ms, and batch-1 throughput was better, since Paddle ops release the GIL.
    switch_interval_ms: float = setting(5.0, above=0)
    # Operations
    grace_s: float = setting(20.0, at_least=0)  # drain time for in-flight streams after SIGTERM
    # Prometheus exposition; 0 turns it off, -1 picks a free port
    metrics_port: int = setting(0, at_least=-1, at_most=65535)
    # the OpenAI-compatible HTTP front and its chat page at /; 0 turns it off, -1 picks a free port
    http_port: int = setting(0, at_least=-1, at_most=65535)
    # Comma-separated Host header values the HTTP front answers (e.g. "llm.example.com,10.0.0.5:8000"), against
    # DNS rebinding; empty: any host.
    allowed_hosts: str = ""
    # an HTTP connection that has not sent a request's headers by then is closed
    http_header_timeout_s: float = setting(5.0, above=0)
    # open HTTP connections; a connection beyond them is closed at once
    http_max_connections: int = setting(1024, at_least=1)
    # liveness fails when no engine iteration for this long while work is queued
    watchdog_s: float = setting(30.0, above=0)
    log_text: bool = False  # log prompts and outputs (off: privacy)
    # Callers: who a call comes from (service/callers.py), and optional per-caller limits (0: off)
    # A metadata key / header naming the caller (e.g. x-llm-d-inference-fairness-id), honoured only from a trusted
    # proxy; with auth on it names a sub-caller within the token, which keeps the token's caps.
    caller_key: str = ""
    # Comma-separated addresses or networks (10.0.0.0/8) of proxies whose X-Forwarded-For and caller_key headers
    # name the client; from anyone else those headers are ignored. Empty: no proxy is trusted.
    trusted_proxies: str = ""
    # The gateway's objectives (x-gateway-inference-objective, from a trusted proxy only) and their priorities,
    # "name=priority,..." (integers; an objective not listed, or none, is 0): a waiting request of a higher priority
    # starts before any of a lower one; callers share fairly within a priority.
    objective_priorities: str = ""
    caller_class_key: str = "x-caller-class"  # names the caller's class, for metrics
    caller_classes: str = ""  # comma-separated: the classes metrics may carry; any other is "default"
    # generated tokens per second one caller may use, on average (0: no cap)
    caller_tokens_per_s: float = setting(0.0, at_least=0)
    # tokens a caller may use at once before the rate applies (0: 10 s of its rate)
    caller_token_burst: int = setting(0, at_least=0)
    # Security
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set to require client certificates (mTLS)
    auth_tokens_file: str = ""
    auth_tokens: str = ""  # comma-separated; prefer the file or the environment over a flag
    auth_reflection: bool = False  # whether reflection needs the bearer token too

    def __post_init__(self) -> None:
        check_bounds(self)
        for part in filter(None, (p.strip() for p in self.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {exc}") from exc
        self.priorities  # noqa: B018 -- parsed at start, so a bad value stops the server with its name

    @functools.cached_property  # read on every call (calls.read_call): parsed once
    def priorities(self) -> dict[str, int]:
        """objective_priorities as a mapping; ValueError naming the setting when an entry is not name=integer."""
        out: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in self.objective_priorities.split(","))):
            name, sep, value = part.partition("=")
            try:
                if not sep or not name.strip():
                    raise ValueError
                out[name.strip()] = int(value)
            except ValueError:
                raise ValueError(f"objective_priorities: {part!r} is not name=integer") from None
        return out

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache) if self.model_cache else default_model_cache()


# Each setting is declared once, in Config or in the EngineConfig nested in it; flags and environment variables
# are flat (--max-slots, TOKENSTREAM_MAX_SLOTS) whichever of the two declares it.
_NESTED = {"engine": EngineConfig}


def _settings() -> list[tuple[str | None, Field]]:
    out: list[tuple[str | None, Field]] = []
    for f in fields(Config):
        if f.name in _NESTED:
            out += [(f.name, nested) for nested in fields(_NESTED[f.name])]
        else:
            out.append((None, f))
    return out


def _default(f: Field) -> object:
    return f.default if f.default_factory is MISSING else f.default_factory()


def config_from(values: Mapping[str, object]) -> Config:
    """A Config from flat setting names (`max_slots=4, port=0`), as flags and tests spell them."""
    top: dict[str, object] = {}
    nested: dict[str, dict[str, object]] = {name: {} for name in _NESTED}
    known = {f.name: parent for parent, f in _settings()}
    for name, value in values.items():
        if name not in known:
            raise TypeError(f"unknown setting {name!r}")
        parent = known[name]
        (nested[parent] if parent else top)[name] = value
    for parent, kind in _NESTED.items():
        top[parent] = kind(**nested[parent])  # type: ignore[arg-type]
    return Config(**top)  # type: ignore[arg-type]


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
    for _, f in _settings():
        default = _default(f)
        parser.add_argument(_flag(f.name), type=_PARSERS[type(default)], default=None,
                            choices=f.metadata.get("choices"),
                            help=f"(env TOKENSTREAM_{f.name.upper()}, default {default!r})")
    return parser


def load_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags win over TOKENSTREAM_* variables, which win over the defaults."""
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    values: dict[str, object] = {}
    for _, f in _settings():
        kind = _PARSERS[type(_default(f))]
        flag_value = getattr(args, f.name)
        if flag_value is not None:
            values[f.name] = flag_value
        elif f"TOKENSTREAM_{f.name.upper()}" in env:
            try:
                values[f.name] = kind(env[f"TOKENSTREAM_{f.name.upper()}"])
                choices = f.metadata.get("choices")
                if choices and values[f.name] not in choices:
                    raise ValueError(f"{values[f.name]!r} is not one of {', '.join(choices)}")
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SystemExit(f"TOKENSTREAM_{f.name.upper()}: {exc}") from exc
    try:
        return config_from(values)
    except ValueError as exc:  # a setting that parsed but means nothing (Config.__post_init__)
        raise SystemExit(f"tokenstream-server: {exc}") from exc
