"""Structured output: constraints compiled with llguidance, and their token masks applied to a batch's logits.

A request's constraint (a JSON schema, any JSON object, a regex, a choice or a grammar) is compiled once, on a
tokenizing worker, into an `LLMatcher` in its start state (`compile_constraint`); each sequence takes its own copy
and advances it with every accepted token (sequence.py). Before each step the engine starts computing the masks of
all constrained rows together, on a worker beside the forward pass (`MaskBatch`), and applies each row's mask to
that row's logits only when it samples (sampling.py). Unconstrained rows are never touched.

llguidance's tokenizer is built from the vocabulary's own bytes (`Tokenizer.token_bytes`), so it serves any model the
engine loads, GGUF included. End-of-sequence tokens are allowed only where the grammar may end.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.numpy as llg_numpy
import numpy as np

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# Bounds on what a caller's constraint may cost: compile fuel, lexer states (memory, ~1-2 kB each), grammar size,
# and per-step mask work. A constraint past them is refused (compile) or its stream ends with an error (a step).
LIMITS: dict[str, Any] = {"max_items_in_row": 2000, "initial_lexer_fuel": 1_000_000, "step_lexer_fuel": 200_000,
                          "step_max_items": 50_000, "max_lexer_states": 50_000, "max_grammar_size": 100_000,
                          "verbose_errors": False}
MAX_SOURCE_BYTES = 64 * 1024  # a schema, regex or grammar's text
MAX_CHOICES = 1024
# JSON is written in one bounded layout ({"a": 1, "b": [2, 3]}): no free whitespace, which a model could spend its
# whole budget on, and the layout JSON serializers write by default.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintError(ValueError):
    """A constraint that cannot be compiled; str() is the compiler's reason."""


@dataclass(frozen=True)
class CompiledConstraint:
    """A compiled constraint: `matcher` is in its start state and is never advanced; sequences copy it."""

    kind: str
    grammar: str  # llguidance's grammar text
    matcher: Any  # llguidance.LLMatcher

    def start(self) -> Any:
        """A fresh matcher for one sequence."""
        return self.matcher.deep_copy()


class _TokenSource:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the EOS id, and a string tokenizer."""

    def __init__(self, tokens: list[bytes], eos: int, encode: Callable[[str], list[int]]) -> None:
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self._encode = encode

    def __call__(self, text: str | bytes) -> list[int]:
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """llguidance's tokenizer for the model's (built once per tokenizer: about a second for 150k tokens).
    `vocab_size` is the logits' width: ids past the tokenizer's own vocabulary have no bytes and are never allowed."""
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(tokenizer)
        if cached is not None:
            return cached
        tokens = []
        for i in range(vocab_size):
            raw = tokenizer.token_bytes(i)
            tokens.append(raw if raw is not None else b"")  # special tokens: never part of constrained text
        eos = list(eos_ids) or [vocab_size - 1]
        plain = getattr(tokenizer, "encode_full", None)
        encode: Callable[[str], list[int]] = (lambda s: list(plain(s).ids)) if plain else tokenizer.encode
        wrapper = llguidance.TokenizerWrapper(_TokenSource(tokens, eos[0], encode))
        built = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos)
        _TOKENIZERS[tokenizer] = built
        return built


def _limits() -> Any:
    return llguidance.LLParserLimits(**LIMITS)


def grammar_text(kind: str, value: Any) -> str:
    """llguidance's grammar for a constraint as a caller gave it; ConstraintError with the reason when it is not
    one. `value`: the schema (JSON text or an object), True for json_object, the regex, the list of choices, or the
    Lark / GBNF text."""
    if isinstance(value, str) and len(value.encode("utf-8")) > MAX_SOURCE_BYTES:
        raise ConstraintError(f"longer than {MAX_SOURCE_BYTES} bytes")
    try:
        if kind == "json_schema":
            schema = json.loads(value) if isinstance(value, str) else value
            if not isinstance(schema, (dict, bool)):
                raise ConstraintError("a JSON schema must be an object (or true / false)")
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))  # type: ignore[arg-type]
        if kind == "json_object":
            return str(llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS))  # type: ignore[arg-type]
        if kind == "regex":
            if not value:
                raise ConstraintError("must not be empty")
            # \d means [0-9], as in JSON schema patterns and most callers' expectation (Rust's is any Unicode digit).
            return str(llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(value, 'd')}/"))
        if kind == "choice":
            if not value:
                raise ConstraintError("must list at least one string")
            if len(value) > MAX_CHOICES:
                raise ConstraintError(f"at most {MAX_CHOICES} choices are allowed")
            if any(not isinstance(c, str) or not c for c in value):
                raise ConstraintError("every choice must be a non-empty string")
            return str(llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value)))
        if kind == "grammar":
            if not value.strip():
                raise ConstraintError("must not be empty")
            return str(llguidance.grammar_from("grammar", value))
    except ConstraintError:
        raise
    except json.JSONDecodeError as exc:
        raise ConstraintError(f"not valid JSON: {exc}") from exc
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ConstraintError(str(exc).strip() or type(exc).__name__) from exc
    raise ConstraintError(f"unknown constraint kind {kind!r}")


def compile_constraint(kind: str, value: Any, tokenizer: Any) -> CompiledConstraint:
    """Compile for this llguidance tokenizer (ll_tokenizer); ConstraintError with the compiler's reason."""
    grammar = grammar_text(kind, value)
    limits = _limits()
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer, limits=limits)
    if error:
        raise ConstraintError(_short(error))
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
    if matcher.is_error():
        raise ConstraintError(_short(matcher.get_error()))
    return CompiledConstraint(kind, grammar, matcher)


def _short(error: str, limit: int = 500) -> str:
    error = error.strip()
    return error if len(error) <= limit else error[: limit - 3] + "..."


def mask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """One row's bitmask (int32 words) as booleans [V]."""
    return np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


def apply_mask(row: np.ndarray, mask: np.ndarray) -> None:
    """In place on one row of logits [V]: every token the mask does not allow to -inf."""
    row[~allowed(mask, row.shape[0])] = -np.inf


class MaskBatch:
    """The next-token masks of a step's constrained rows, computed together on a worker while the forward pass
    runs. `start(matchers)` before the step, `masks()` when sampling: each row's mask, or None (unconstrained)."""

    _executor: Any = None
    _pool: ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    def __init__(self, matchers: Sequence[Any | None], vocab_size: int) -> None:
        self.rows = [(m, i) for i, m in enumerate(matchers) if m is not None]
        self.bits = np.zeros((len(matchers) if self.rows else 0, mask_width(vocab_size)), dtype=np.int32)
        self._future: Future[None] | None = None
        self._n = len(matchers)

    @classmethod
    def _workers(cls) -> tuple[Any, ThreadPoolExecutor]:
        with cls._lock:
            if cls._pool is None:
                cls._executor = llguidance.LLExecutor(num_threads=2)
                cls._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenstream-masks")
            return cls._executor, cls._pool

    def _fill(self) -> None:
        executor, _ = self._workers()
        llg_numpy.fill_next_token_bitmask_par(executor, self.rows, self.bits)

    def start(self) -> MaskBatch:
        """Begin computing (llguidance drops the GIL while it works)."""
        if self.rows:
            _, pool = self._workers()
            self._future = pool.submit(self._fill)
        return self

    def masks(self) -> list[np.ndarray | None]:
        if self.rows:
            if self._future is None:
                self._fill()
            else:
                self._future.result()
        out: list[np.ndarray | None] = [None] * self._n
        for _, i in self.rows:
            out[i] = self.bits[i]
        return out
