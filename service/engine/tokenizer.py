"""Tokenizer wrapper, incremental detokenizer and chat template rendering."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from service.engine.api import ChatTemplateError


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]  # character offsets


class Tokenizer:
    """A `tokenizers.Tokenizer` with its tokenizer_config (chat template, bos/eos token strings).

    `add_bos`: prompts start with the BOS token (added when the text does not begin with it already), as
    llama.cpp does for GGUF vocabularies that ask for it.
    """

    def __init__(self, tok: HFTokenizer, config: dict[str, Any] | None = None, *, add_bos: bool = False) -> None:
        self._tok = tok
        self._plain: HFTokenizer | None = None  # a copy that never matches special tokens, made when needed
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template: str | None = self.config.get("chat_template") or None
        self._compiled_template: Any = None
        bos = self.config.get("bos_token")
        self.bos_id: int | None = tok.token_to_id(bos) if isinstance(bos, str) else None
        if add_bos and self.bos_id is None:
            raise ValueError(f"add_bos is set but the BOS token {bos!r} is not in the vocabulary")
        self.add_bos = add_bos
        self._special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_dir(cls, model_dir: Path) -> Tokenizer:
        """A Hugging Face layout: tokenizer.json and, when present, tokenizer_config.json."""
        cfg_path = model_dir / "tokenizer_config.json"
        config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
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

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if not self.chat_template:
            raise ChatTemplateError("the model has no chat template (tokenizer_config.json has no chat_template)")
        if self._compiled_template is None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise jinja2.TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._compiled_template = env.from_string(self.chat_template)
        try:
            return str(
                self._compiled_template.render(
                    messages=messages,
                    add_generation_prompt=True,
                    bos_token=self.config.get("bos_token") or "",
                    eos_token=self.config.get("eos_token") or "",
                )
            )
        except Exception as exc:  # a template may raise on roles it does not accept
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
