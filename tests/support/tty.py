"""A text stream that says it is a terminal, for CLI tests of what the client does at one (prompts, status)."""

from __future__ import annotations

import io


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True
