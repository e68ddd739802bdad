"""Tokenizer wrapper, incremental detokenizer and chat template rendering."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template failed to render the messages."""


@dataclass(frozen=True)
class Encoding:
    ids: list[int]
    tokens: list[str]
    offsets: list[tuple[int, int]]  # character offsets


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        self._tok = HFTokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self.chat_template: str | None = self.config.get("chat_template") or None
        self._compiled_template: Any = None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_full(self, text: str) -> Encoding:
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
