"""`tokenstream chat`: a multi-turn conversation, each answer streamed as it is generated.

Every turn sends the whole history as `messages`; the server renders it with the model's chat template. Ctrl-C
while an answer streams cancels that call, so the server frees its slot, and keeps what arrived in the history:
the user has read it, and the next question ("go on", "shorter") refers to it. An answer that failed, or was
stopped before any text arrived, is dropped with its question, so that two user turns never follow each other
(strict chat templates reject that).
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from typing import TextIO

from tokenstream_client._terminal import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    StatusLine,
    delta_line,
    report_error,
    report_failed_stream,
)
from tokenstream_client.client import Client, GenerateStream
from tokenstream_client.errors import TokenstreamError
from tokenstream_client.request import GenerateParams

PROMPT = "> "
HELP = """\
/reset   forget the conversation (the --system prompt stays)
/help    this list
/exit    quit; so do Ctrl-D and Ctrl-C at the prompt
Ctrl-C while an answer streams stops it; what arrived stays in the history. A line starting with // sends the
rest with one leading /.
"""


@dataclass(frozen=True)
class ChatOptions:
    params: GenerateParams  # sampling and stopping, the same for every turn
    system: str | None = None  # the system message, sent first in every turn
    timeout: float | None = None  # deadline of each answer, in seconds
    request_id: str | None = None  # a prefix: turn n is sent as "<request_id>-<n>"
    json_output: bool = False  # one JSON line per message, as `generate --json` writes them
    stats: bool = False  # TTFT and tokens/s on stderr after each answer
    banner: bool = False


class ChatSession:
    """Reads lines from `inp` until the end of it, /exit or Ctrl-C at the prompt; answers go to `out`, everything
    else (status, command output, errors) to `err`.

    With a person at a terminal (stdin is one) a failed turn is reported and the chat goes on; from a pipe the
    first failure ends it with its exit status, since later turns would build on the missing one.
    """

    def __init__(self, client: Client, options: ChatOptions, inp: TextIO, out: TextIO, err: TextIO) -> None:
        self.client = client
        self.options = options
        self.inp, self.out, self.err = inp, out, err
        self.history: list[dict[str, str]] = []
        self.turns = 0
        self.interactive = inp.isatty()
        self.prompt = PROMPT if self.interactive and out.isatty() else ""
        # input() gives line editing (with readline), but only on the process's own stdin and stdout
        self.use_input = bool(self.prompt) and inp is sys.stdin and out is sys.stdout

    def run(self) -> int:
        if self.use_input:
            import readline  # noqa: F401  (imported for its effect: line editing and history in input())
        if self.options.banner and self.interactive:
            self.err.write(f"chatting with {self.client.target}; /help lists the commands, Ctrl-D quits\n")
        try:
            while (line := self._read()) is not None:
                code = self._handle(line.strip())
                if code is None:
                    return EXIT_OK
                if code != EXIT_OK and not self.interactive:
                    return code
        except KeyboardInterrupt:  # at the prompt, or once an answer was whole
            self._leave_prompt()
            return EXIT_INTERRUPTED
        self._leave_prompt()
        return EXIT_OK

    def _read(self) -> str | None:
        """The next line; None at the end of the input (Ctrl-D)."""
        if self.use_input:
            try:
                return input(self.prompt)
            except EOFError:
                return None
        if self.prompt:
            self.out.write(self.prompt)
            self.out.flush()
        return self.inp.readline() or None

    def _leave_prompt(self) -> None:
        if self.prompt:  # the shell's prompt then starts on a line of its own
            self.out.write("\n")
            self.out.flush()

    def _handle(self, line: str) -> int | None:
        """The exit status of one input line; None when it asks to quit."""
        if not line:
            return EXIT_OK
        if line.startswith("/") and not line.startswith("//"):
            return self._command(line.split(maxsplit=1)[0])
        return self._turn(line.removeprefix("/"))

    def _command(self, name: str) -> int | None:
        if name == "/exit":
            return None
        if name == "/reset":
            self.history.clear()
            self.err.write("history cleared\n")
        elif name == "/help":
            self.err.write(HELP)
        else:
            self.err.write(f"unknown command {name}; /help lists the commands\n")
            return EXIT_USAGE
        self.err.flush()
        return EXIT_OK

    def _turn(self, text: str) -> int:
        self.turns += 1
        self.history.append({"role": "user", "content": text})
        system = [{"role": "system", "content": self.options.system}] if self.options.system else []
        params: GenerateParams = {**self.options.params, "messages": system + self.history}
        prefix = self.options.request_id
        stream = self.client.generate(timeout=self.options.timeout,
                                      request_id=f"{prefix}-{self.turns}" if prefix else None, **params)
        status = StatusLine(self.err, shares_terminal=True) if self.options.stats else None
        answer: list[str] = []
        error: TokenstreamError | None = None
        with contextlib.ExitStack() as stack:
            stack.enter_context(stream)  # leaving it closes the stream, which cancels a call still running
            if status is not None:
                stack.enter_context(status)
            try:
                for delta in stream:
                    if status is not None:
                        status.on_delta(delta)
                    answer.append(delta.text)
                    self.out.write(delta_line(delta, stream.request_id) if self.options.json_output else delta.text)
                    self.out.flush()
            except KeyboardInterrupt:
                if stream.final is not None:
                    raise  # the answer was whole: this Ctrl-C is one at the prompt
                stream.close()  # at once: the server stops decoding and frees the slot
            except TokenstreamError as exc:
                error = exc
        return self._conclude("".join(answer), stream, status, error)

    def _conclude(self, answer: str, stream: GenerateStream, status: StatusLine | None,
                  error: TokenstreamError | None) -> int:
        """Keep the answer in the history, or drop the turn; say how it ended."""
        if not self.options.json_output and answer and not answer.endswith("\n"):
            self.out.write("\n")
            self.out.flush()
        final = stream.final
        if error is not None:
            self.history.pop()
            code = report_error(error, self.options.json_output, self.out, self.err)
            if self.history and any(v.field.startswith("messages") for v in error.field_violations):
                self.err.write("  (/reset clears the history)\n")  # e.g. it no longer fits the context
            return code
        if final is None:  # interrupted
            if answer:
                self.history.append({"role": "assistant", "content": answer})
            else:
                self.history.pop()
            if self.options.json_output:
                self.out.write(json.dumps({"interrupted": True, "request_id": stream.request_id}) + "\n")
                self.out.flush()
            elif status is not None:
                status.summary(None, ended="interrupted")
            else:
                self.err.write("interrupted\n")
            return EXIT_OK
        code = report_failed_stream(final, stream.request_id, self.err)
        if code != EXIT_OK:
            self.history.pop()
            return code
        self.history.append({"role": "assistant", "content": answer})
        if status is not None:
            status.summary(final)
        return EXIT_OK
