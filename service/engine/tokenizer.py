"""Tokenizer wrapper, incremental detokenizer and chat template rendering."""

from __future__ import annotations

import contextvars
import functools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as HFTokenizer

from service.engine.api import ChatTemplateError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file, which wins over tokenizer_config.json's


# -- chat templates: HF's template environment, bounded ----------------------------------------------------
#
# A template comes with the model, so it is untrusted: jinja2's sandbox stops attribute escapes, and the limits
# below stop resource use. A render runs in a thread that cannot be killed, so nothing waits for a timeout:
# every operation that can grow a value is checked before it runs (or, where its inputs are already bounded, on
# its result), and every loop iteration and call spends from a per-render budget.

MAX_RENDER_CHARS = 1 << 21  # one string or list, and the rendered chat; more than any context holds as text
MAX_RENDER_STEPS = 100_000  # loop iterations and calls in one render
MAX_RENDER_WORK = 1 << 25  # characters and items built in one render, all operations together
MAX_CALL_INT = 100_000  # an integer passed to a call or filter (widths, counts); jinja2's own range limit
MAX_INT_BITS = 256  # integer arithmetic: chat templates count messages, they do not do bignum maths
MAX_JSON_INDENT = 16


class RenderLimitError(SecurityError):
    """A chat template went past one of its render limits."""


@dataclass
class _Budget:
    steps: int = 0
    work: int = 0


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    # Outside render_bounded (jinja2 folding a constant at compile time) one operation is checked on its own.
    return _BUDGET.get() or _Budget()


def _step() -> None:
    budget = _budget()
    budget.steps += 1
    if budget.steps > MAX_RENDER_STEPS:
        raise RenderLimitError(f"chat template exceeded {MAX_RENDER_STEPS} loop iterations and calls")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple | dict | set | frozenset | bytes) else 0


def _build(size: int, what: str) -> None:
    """Refuse, before it is built, a value of `size` characters or items; count it towards the render's work."""
    if size > MAX_RENDER_CHARS:
        raise RenderLimitError(f"chat template would build {what} of {size} characters or items (limit "
                               f"{MAX_RENDER_CHARS})")
    budget = _budget()
    budget.work += size
    if budget.work > MAX_RENDER_WORK:
        raise RenderLimitError(f"chat template exceeded {MAX_RENDER_WORK} characters of work in one render")


def _check_int(value: Any, what: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_CALL_INT:
        raise RenderLimitError(f"chat template passes {value} to {what} (limit {MAX_CALL_INT})")


# Widths and precisions in %-format and str.format specs: "%10000000s", "{:>10000000}".
_PERCENT_WIDTHS = re.compile(r"%[#0\- +]*(\d*)(?:\.(\d+))?")
_BRACE_WIDTHS = re.compile(r"\{[^{}]*:[^{}\d]*(\d*)(?:\.(\d+))?[^{}]*\}")


def _check_format(fmt: str, pattern: re.Pattern[str]) -> None:
    for m in pattern.finditer(fmt):
        for digits in m.groups():
            if digits and (len(digits) > 7 or int(digits) > MAX_CALL_INT):
                raise RenderLimitError(f"chat template formats with width {digits} (limit {MAX_CALL_INT})")


def _predict_join(items: Iterable[Any], sep: Any) -> tuple[list[Any], int]:
    listed = list(items)
    _build(len(listed), "a list")
    return listed, sum(len(str(x)) for x in listed) + len(str(sep)) * max(len(listed) - 1, 0)


def _predict_replace(s: str, old: str, new: str, count: int = -1) -> int:
    hits = len(s) + 1 if old == "" else s.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(len(new) - len(old), 0)


def _bounded_method(obj: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pre-checks for the str methods that can grow far past their inputs; returns the (materialized) args."""
    target = getattr(obj, "__wrapped__", obj)
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if not isinstance(owner, str):
        return args
    if name == "join" and args:
        listed, size = _predict_join(args[0], owner)
        _build(size, "a joined string")
        return (listed, *args[1:])
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _build(_predict_replace(owner, *args[:2], *(args[2:3] or [-1])), "a replaced string")
    elif name == "expandtabs":
        tab = args[0] if args and isinstance(args[0], int) else 8
        _build(len(owner) + owner.count("\t") * max(tab, 0), "an expanded string")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _build(len(owner) * max(longest, 1), "a translated string")
    elif name in ("format", "format_map"):
        _check_format(owner, _BRACE_WIDTHS)
    return args


class _BoundedCodeGenerator(CodeGenerator):
    """Every `for` iterates through environment.bounded_iter, and `~` joins through environment.bounded_concat."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:  # noqa: N802
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None,
                                   lineno=loop.iter.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, as HF's AssistantTracker parses it: the body renders as it is."""

    tags = {"generation"}  # noqa: RUF012 -- jinja2 declares it so

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class BoundedTemplateEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat template environment (trim_blocks, lstrip_blocks, loop controls, `generation` blocks,
    its tojson, raise_exception and strftime_now), with the render limits above."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    def bounded_iter(self, iterable: Any) -> Iterator[Any]:
        for item in iterable:
            _step()
            yield item

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        out = "".join(str(p) for p in parts)  # each part is bounded already: check the sum
        _build(len(out), "a concatenated string")
        return out

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if _size(seq) and isinstance(n, int):
                    _build(_size(seq) * max(n, 0), "a repeated string or list")
            if isinstance(left, int) and isinstance(right, int):
                self._check_bits(left.bit_length() + right.bit_length())
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            self._check_bits(left.bit_length() * right)
        elif operator == "%" and isinstance(left, str):
            _check_format(left, _PERCENT_WIDTHS)
            for arg in right if isinstance(right, tuple) else (right,):
                _check_int(arg, "a % format")
        result = super().call_binop(context, operator, left, right)
        _build(_size(result), "a string or list")
        return result

    @staticmethod
    def _check_bits(bits: int) -> None:
        if bits > MAX_INT_BITS:
            raise RenderLimitError(f"chat template computes an integer of about {bits} bits (limit {MAX_INT_BITS})")

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any,  # noqa: N805 -- jinja2's names
             **kwargs: Any) -> Any:
        _step()
        for value in (*args, *kwargs.values()):
            _check_int(value, getattr(__obj, "__name__", "a call"))
        args = _bounded_method(__obj, args)
        result = super().call(__context, __obj, *args, **kwargs)
        _build(_size(result), "a call's result")
        return result


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that spends a step, refuses large integer arguments, and pre-checks those that can grow."""
    # pass_context / pass_eval_context / pass_environment filters get that object first, then the value.
    passes = getattr(f, "jinja_pass_arg", None) is not None

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _step()
        value, rest = (args[1], args[2:]) if passes else (args[0], args[1:])
        for arg in (*rest, *kwargs.values()):
            _check_int(arg, f"the {name} filter")
        if name == "join":
            listed, size = _predict_join(value, rest[0] if rest else kwargs.get("d", ""))
            _build(size, "a joined string")
            args = (args[0], listed, *rest) if passes else (listed, *rest)
        elif name == "replace" and isinstance(value, str) and len(rest) >= 2:
            _build(_predict_replace(value, str(rest[0]), str(rest[1]), *(rest[2:3] or [-1])), "a replaced string")
        elif name == "indent" and isinstance(value, str):
            width = rest[0] if rest else kwargs.get("width", 4)
            per_line = len(width) if isinstance(width, str) else max(int(width), 0)
            _build(len(value) + (value.count("\n") + 1) * per_line, "an indented string")
        elif name == "wordwrap" and isinstance(value, str):
            wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
            _build(len(value) * (1 + len(str(wrap))), "a wrapped string")
        elif name == "format" and isinstance(value, str):
            _check_format(value, _PERCENT_WIDTHS)
        result = f(*args, **kwargs)
        _build(_size(result), f"the {name} filter's result")
        return result

    return bounded


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """transformers' tojson: plain JSON (no HTML escaping), with its options; the indent is bounded."""
    if isinstance(indent, int) and indent > MAX_JSON_INDENT:
        raise RenderLimitError(f"chat template's tojson indent {indent} is above {MAX_JSON_INDENT}")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def select_chat_template(value: Any, where: str = "chat_template") -> str | None:
    """The template to use from a tokenizer config's `chat_template`: a string, or transformers' list of
    {"name", "template"} (its "default" one, as transformers picks without tools)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ChatTemplateError(f"{where}: each entry of a list must be {{\"name\": ..., \"template\": ...}}")
            named[entry["name"]] = entry["template"]
        if "default" in named:
            return named["default"]
        if len(named) == 1:
            return next(iter(named.values()))
        raise ChatTemplateError(f"{where} holds several templates ({', '.join(sorted(named))}) and none is named "
                                "'default'")
    raise ChatTemplateError(f"{where} is a {type(value).__name__}, not a string or a list of named templates")


def compile_chat_template(template: str) -> jinja2.Template:
    """The template compiled in the bounded environment; ChatTemplateError when it does not compile."""
    try:
        return BoundedTemplateEnvironment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: line {exc.lineno}: {exc.message}") from exc
    except Exception as exc:  # a limit hit while folding constants, or anything else jinja2 raises
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def render_bounded(template: jinja2.Template, **variables: Any) -> str:
    """Render within the limits, the output included (counted as it is produced)."""
    token = _BUDGET.set(_Budget())
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise RenderLimitError(f"chat template output exceeds {MAX_RENDER_CHARS} characters")
            out.append(chunk)
        return "".join(out)
    finally:
        _BUDGET.reset(token)


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]  # character offsets


@functools.cache
def _byte_level() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for bytes (GPT-2's bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def piece_bytes(piece: str) -> bytes | None:
    """A vocabulary entry's bytes: byte-level BPE ("Ġhi"), a byte-fallback piece ("<0xE4>"), or
    SentencePiece text ("▁hi"); None when it is none of these."""
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    decoder = _byte_level()
    if piece and all(c in decoder for c in piece):
        return bytes(decoder[c] for c in piece)
    return None


class Tokenizer:
    """A `tokenizers.Tokenizer` with its tokenizer_config (chat template, bos/eos token strings).

    `add_bos`: prompts start with the BOS token (added when the text does not begin with it already), as
    llama.cpp does for GGUF vocabularies that ask for it.
    """

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, *, add_bos: bool = False) -> None:
        self._tok = tok
        self._plain: HFTokenizer | None = None  # a copy that never matches special tokens, made when needed
        self.config: dict[str, Any] = dict(config or {})
        # Compiled here, so that a template that does not compile fails the load, not every chat request.
        self.chat_template: str | None = select_chat_template(self.config.get("chat_template"))
        self._compiled_template = None if self.chat_template is None else compile_chat_template(self.chat_template)
        bos = self.config.get("bos_token")
        self.bos_id: int | None = tok.token_to_id(bos) if isinstance(bos, str) else None
        if add_bos and self.bos_id is None:
            raise ValueError(f"add_bos is set but the BOS token {bos!r} is not in the vocabulary")
        self.add_bos = add_bos
        self._special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """A Hugging Face layout: tokenizer.json and, when present, tokenizer_config.json and chat_template.jinja
        (which wins over tokenizer_config.json's chat_template, as in transformers)."""
        cfg_path = model_dir / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if not isinstance(config, dict):
            raise ChatTemplateError(f"{cfg_path} is not a JSON object")
        template_path = model_dir / CHAT_TEMPLATE_FILE
        if template_path.exists():
            config["chat_template"] = template_path.read_text(encoding="utf-8")
        return cls(HFTokenizer.from_file(str(model_dir / "tokenizer.json")), config)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _with_bos(self, ids: list[int]) -> list[int]:
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            return [self.bos_id, *ids]
        return ids

    def encode(self, text: str) -> list[int]:
        """A prompt's ids (with BOS when the model asks for it); special tokens in the text are matched."""
        return self._with_bos(list(self._tok.encode(text, add_special_tokens=False).ids))

    def encode_full(self, text: str) -> Encoding:
        """The text's own tokens (never a BOS), with strings and offsets."""
        enc = self._tok.encode(text, add_special_tokens=False)
        # The Rust tokenizer reports byte-level offsets in characters already for str input.
        return Encoding(list(enc.ids), list(enc.tokens), [tuple(o) for o in enc.offsets])  # type: ignore[misc]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        """A token's own bytes from the vocabulary (a token that is part of a character decodes to U+FFFD alone);
        None where its vocabulary entry is no byte-level, byte-fallback or SentencePiece piece."""
        piece = self._tok.id_to_token(token_id)
        return piece_bytes(piece) if isinstance(piece, str) else None

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if self._compiled_template is None:
            raise ChatTemplateError("the model has no chat template (tokenizer_config.json has no chat_template)")
        try:
            return render_bounded(
                self._compiled_template,
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.config.get("bos_token") or "",
                eos_token=self.config.get("eos_token") or "",
            )
        except Exception as exc:  # a template may raise on roles it does not accept, or pass a render limit
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of the rendered chat, where special tokens come only from the template's own markup.

        Message content is text: a user who writes `<|im_end|>` gets the tokens of that text, never the control
        token, so no message can close its turn and forge another. Where no content holds special-token text,
        the ids are exactly those of encoding the rendered template.
        """
        text = self.render_chat(messages)
        enc = self._tok.encode(text, add_special_tokens=False)
        specials = [(i, o) for i, o in zip(enc.ids, enc.offsets, strict=True) if i in self._special_ids]
        spans = self._content_spans(messages, text)
        if spans is None:
            # The template transforms content in a way we cannot trace: accept the rendering only when its
            # special tokens are exactly those of the markup alone.
            markup = self._markup_specials(messages)
            if [i for i, _ in specials] != markup:
                raise ChatTemplateError("message content contains special-token text (e.g. a turn marker), which "
                                        "this model's chat template does not allow to be kept as plain text")
            return self._with_bos(list(enc.ids))
        forged = [o for _, o in specials if any(s < o[1] and o[0] < e for s, e in spans)]
        if not forged:
            return self._with_bos(list(enc.ids))
        # Encode between the template's own special tokens with special-token matching off: the special tokens
        # split the text into independent pieces anyway, so only the forged ones change.
        ids: list[int] = []
        pos = 0
        for token_id, (start, end) in specials:
            if (start, end) in forged:
                continue
            ids += self._plain_encode(text[pos:start])
            ids.append(token_id)
            pos = end
        ids += self._plain_encode(text[pos:])
        return self._with_bos(ids)

    def _plain_encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self._plain is None:
            plain = HFTokenizer.from_str(self._tok.to_str())
            plain.encode_special_tokens = True  # special tokens' text is encoded as ordinary text
            self._plain = plain
        return list(self._plain.encode(text, add_special_tokens=False).ids)

    def _content_spans(self, messages: list[dict[str, str]], text: str) -> list[tuple[int, int]] | None:
        """Character spans of message content in `text`, found by rendering with placeholders instead.

        None when the rendering with the real content is not the placeholder rendering with the content (or
        the stripped content, as templates that `trim` it produce) put in.
        """
        nonce = secrets.token_hex(8)
        marker = re.compile("\ue000" + nonce + "(\\d+)\ue001")
        held = [{**m, "content": f"\ue000{nonce}{i}\ue001"} for i, m in enumerate(messages)]
        parts = marker.split(self.render_chat(held))  # markup, index, markup, index, ..., markup
        for transform in (lambda c: c, str.strip):
            spans, out, pos = [], [], 0
            for k, part in enumerate(parts):
                piece = part if k % 2 == 0 else transform(messages[int(part)].get("content", ""))
                if k % 2:
                    spans.append((pos, pos + len(piece)))
                out.append(piece)
                pos += len(piece)
            if "".join(out) == text:
                return spans
        return None

    def _markup_specials(self, messages: list[dict[str, str]]) -> list[int]:
        held = [{**m, "content": "x"} for m in messages]
        ids = self._tok.encode(self.render_chat(held), add_special_tokens=False).ids
        return [i for i in ids if i in self._special_ids]


class IncrementalDetokenizer:
    """Decodes generated ids into text deltas that never end inside a multi-byte character.

    Prefix/read offsets as in TGIS and HF TGI: only a short window of ids is decoded per token, and text
    is released only once the window no longer ends in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window decoded as context
        self._read = 0  # end of the ids whose text has been released

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        window = self.ids[self._prefix :]
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read])
        text = self._tok.decode(window)
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end: release held bytes as the full decode would show them."""
        if self._read == len(self.ids):
            return ""
        prefix_text = self._tok.decode(self.ids[self._prefix : self._read])
        text = self._tok.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text) :]
