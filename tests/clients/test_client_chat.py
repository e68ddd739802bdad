"""`tokenstream chat` against the real server: the history each turn sends, /reset, Ctrl-C during an answer."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.support.tty import FakeTTY
from tokenstream_client import Client
from tokenstream_client.cli import main

CLIENTS = Path(__file__).resolve().parents[2] / "clients"
LONG = ("--max-new-tokens", "400", "--min-new-tokens", "400")  # EOS cannot end it
FIRST_STEPS = 20  # decode steps an answer gets before the Ctrl-C; then the gate holds it, far from LONG
CLEAR_LINE = "\r\x1b[K"
WAITING = "waiting for the first token"


def chat(server: Any, *argv: str, stdin: str, tty: bool = False, typed: bool = False) -> tuple[int, str, str]:
    """tty: stdout and stderr are a terminal; typed: stdin is one too (a person types)."""
    out, err = (FakeTTY(), FakeTTY()) if tty else (io.StringIO(), io.StringIO())
    inp = FakeTTY(stdin) if typed else io.StringIO(stdin)
    code = main(["chat", "--target", server.target, *argv], stdin=inp, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def answers(out: str) -> list[list[dict[str, Any]]]:
    """JSON lines, one list per turn: each ends with its final message, an `interrupted` or an `error` record."""
    groups: list[list[dict[str, Any]]] = [[]]
    for line in out.splitlines():
        record = json.loads(line)
        groups[-1].append(record)
        if record.get("finish_reason") or record.get("interrupted") or record.get("error"):
            groups.append([])
    assert groups[-1] == []
    return groups[:-1]


def text(answer: list[dict[str, Any]]) -> str:
    return "".join(r.get("text", "") for r in answer)


def prompt_ids(loaded_model: Any, *turns: tuple[str, str]) -> list[int]:
    """What the server should have received: the turns through the model's chat template."""
    tok = loaded_model.tokenizer
    return list(tok.encode(tok.render_chat([{"role": role, "content": content} for role, content in turns])))


def idle(server: Any) -> bool:
    return bool(server.engine.wait_until(lambda s: s.active == 0 and s.waiting == 0, timeout=30))


def test_each_turn_sends_the_history_and_reset_clears_it(server: Any, loaded_model: Any) -> None:
    system = "You are terse."
    code, out, err = chat(server, "--json", "--echo-prompt-tokens", "--max-new-tokens", "6", "--system", system,
                          "--request-id", "conv-7", stdin="Hello there\nAnd then?\n/reset\nHello there\n")
    assert code == 0, err
    first, second, third = answers(out)
    assert [a[-1]["request_id"] for a in (first, second, third)] == ["conv-7-1", "conv-7-2", "conv-7-3"]
    assert first[0]["prompt_token_ids"] == prompt_ids(loaded_model, ("system", system), ("user", "Hello there"))
    assert second[0]["prompt_token_ids"] == prompt_ids(
        loaded_model, ("system", system), ("user", "Hello there"), ("assistant", text(first)), ("user", "And then?"))
    assert second[-1]["usage"]["prompt_tokens"] == len(second[0]["prompt_token_ids"])
    # /reset: the same first question again, with the system message but no history; greedy, so the same answer
    assert third[0]["prompt_token_ids"] == first[0]["prompt_token_ids"]
    assert text(third) == text(first)
    assert err == "history cleared\n"


def test_answers_over_a_pipe_are_plain_text_lines(server: Any) -> None:
    code, json_out, _ = chat(server, "--json", "--max-new-tokens", "5", stdin="Hi\n\nWhy?\n")
    assert code == 0
    expected = "".join(t if t.endswith("\n") else t + "\n" for t in map(text, answers(json_out)))
    code, out, err = chat(server, "--max-new-tokens", "5", stdin="Hi\n\nWhy?\n")  # the empty line is skipped
    assert (code, out, err) == (0, expected, "")  # not a terminal: no prompt, no status


def test_on_a_terminal_each_answer_shows_ttft_and_tokens_per_second(server: Any) -> None:
    code, out, err = chat(server, "--max-new-tokens", "6", "--min-new-tokens", "6", stdin="Hi\nAgain\n", tty=True)
    assert code == 0
    assert out.count("\n") == 2  # two answers, each ending its line
    # each line: any "waiting for the first token" redraws (\r-separated), then the summary after the last one
    summaries = [line.rpartition(CLEAR_LINE)[2] for line in err.removesuffix("\n").split("\n")]
    assert len(summaries) == 2
    for summary in summaries:
        assert summary.startswith("MAX_TOKENS · TTFT ")
        assert "6 tokens" in summary
        assert "tok/s" in summary
    code, _, err = chat(server, "--max-new-tokens", "6", "--quiet", stdin="Hi\n", tty=True)
    assert (code, err) == (0, "")


def test_from_a_pipe_the_first_failure_ends_the_chat(server: Any) -> None:
    code, out, err = chat(server, "--top-p", "2", stdin="Hi\nAgain\n")
    assert (code, out) == (1, "")
    assert err.count("error: INVALID_ARGUMENT") == 1
    assert "sampling.top_p" in err
    code, _, err = chat(server, "--max-new-tokens", "2", stdin="/nope\nHi\n")
    assert code == 2
    assert err == "unknown command /nope; /help lists the commands\n"


def test_at_a_terminal_a_failed_turn_is_reported_and_the_chat_goes_on(server: Any, loaded_model: Any) -> None:
    too_long = "word " * 600  # more tokens than the test server's 512-token context
    code, out, err = chat(server, "--max-new-tokens", "4", "--quiet", "--json", "--echo-prompt-tokens",
                          stdin=f"Hi\n{too_long}\nAgain\n/help\n/exit\nnever sent\n", tty=True, typed=True)
    assert code == 0
    assert out.startswith("> ")  # a prompt before each line read
    records = "".join(line.lstrip("> ") + "\n" for line in out.splitlines() if line.lstrip("> "))
    hi, failed, again = answers(records)  # and none for "never sent": /exit ended the chat
    assert failed[0]["error"]["code"] == "INVALID_ARGUMENT"
    assert "  (/reset clears the history)" in err
    assert "/reset   forget the conversation" in err  # /help
    assert again[0]["prompt_token_ids"] == prompt_ids(  # the failed turn was dropped from the history
        loaded_model, ("user", "Hi"), ("assistant", text(hi)), ("user", "Again"))


# `python -m tokenstream_client` with Ctrl-C raising KeyboardInterrupt, as in a terminal session. A test run started
# in the background (`make test &` in a script, some CI runners) hands its children SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler.
CHAT = [sys.executable, "-c", "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('tokenstream_client', run_name='__main__')", "chat"]


@pytest.fixture
def chat_process(gated_server: Any) -> Iterator[subprocess.Popen[str]]:
    server = gated_server
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CLIENTS), *sys.path]))
    proc = subprocess.Popen(
        [*CHAT, "--target", server.target, "--json",
         "--echo-prompt-tokens", *LONG],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def say(stdin: IO[str] | None, line: str) -> None:
    assert stdin is not None
    stdin.write(line + "\n")
    stdin.flush()


def read_answer(stdout: IO[str] | None) -> list[dict[str, Any]]:
    assert stdout is not None
    records = [json.loads(stdout.readline())]
    while not (records[-1].get("finish_reason") or records[-1].get("interrupted")):
        records.append(json.loads(stdout.readline()))
    return records


def read_tokens(stdout: IO[str] | None, count: int) -> list[dict[str, Any]]:
    """The records that carry the answer's first `count` tokens."""
    assert stdout is not None
    records: list[dict[str, Any]] = []
    while sum(len(r["token_ids"]) for r in records) < count:
        records.append(json.loads(stdout.readline()))
    return records


def held(server: Any, gate: Any) -> int:
    """Permit FIRST_STEPS decode steps: the next answer then waits, its slot taken, for a step that never comes;
    only a cancel frees it. Returns the engine's step count once it is held so."""
    steps = int(server.engine.stats().steps) + FIRST_STEPS
    gate.permit(FIRST_STEPS)
    return steps


def cancelled_by_the_client(server: Any, finished_calls: Any, before: float) -> None:
    """The Ctrl-C cancelled the call: its slot was freed while the engine was held, and the server ended it as
    CANCELLED. (A call answered after the slot was freed proves the record written: it is written along with the
    engine cancel, on the server's event loop.)"""
    assert idle(server)
    with Client(server.target, timeout=30) as client:
        assert client.health() == "SERVING"
    assert finished_calls(server, "cancelled", "CANCELLED") == before + 1


def test_ctrl_c_stops_the_answer_keeps_it_and_the_chat_goes_on(
    gated_server: Any, gate: Any, loaded_model: Any, chat_process: subprocess.Popen[str], finished_calls: Any
) -> None:
    server, proc = gated_server, chat_process
    cancelled = finished_calls(server, "cancelled", "CANCELLED")
    steps = held(server, gate)
    say(proc.stdin, "Tell me a long story")
    shown = read_tokens(proc.stdout, FIRST_STEPS + 1)  # the prefill's token and one per permitted step
    assert server.engine.wait_until(lambda s: s.steps == steps and s.active == 1, timeout=30)  # held, far from done
    proc.send_signal(signal.SIGINT)
    cancelled_by_the_client(server, finished_calls, cancelled)
    rest = read_answer(proc.stdout)
    assert [r.get("token_ids") for r in rest] == [None] and rest[0]["interrupted"] is True  # nothing after Ctrl-C
    assert sum(len(r["token_ids"]) for r in shown) == FIRST_STEPS + 1

    gate.open()
    say(proc.stdin, "Go on")
    second = read_answer(proc.stdout)
    assert second[-1]["finish_reason"] in {"MAX_TOKENS", "CONTEXT_LENGTH"}  # a whole answer
    assert second[0]["prompt_token_ids"] == prompt_ids(  # exactly what was shown stayed in the history
        loaded_model, ("user", "Tell me a long story"), ("assistant", text(shown)), ("user", "Go on"))

    proc.send_signal(signal.SIGINT)  # at the prompt: quits
    assert proc.wait(timeout=30) == 130
    assert idle(server)


def read_until(fd: int, done: Any, timeout: float = 60.0) -> str:
    """Read the terminal until done(text so far) holds."""
    data = b""
    deadline = time.monotonic() + timeout
    while not done(data.decode(errors="replace")):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"the terminal showed only {data!r}"
        data += os.read(fd, 4096)
    return data.decode(errors="replace")


def answer_started(screen: str) -> bool:
    """Whether text follows the echoed question and any 'waiting for the first token' status."""
    after_echo = screen.partition("story")[2].partition("\n")[2]
    last = re.split(re.escape(CLEAR_LINE), after_echo)[-1]
    return bool(last) and not (last.startswith(WAITING) or WAITING.startswith(last))


def test_on_a_terminal(gated_server: Any, gate: Any, finished_calls: Any) -> None:
    """A person at a terminal: a prompt, Ctrl-C stops an answer with its TTFT shown, /help, Ctrl-D quits."""
    server = gated_server
    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CLIENTS), *sys.path]), TERM="dumb")
    proc = subprocess.Popen(
        [*CHAT, "--target", server.target, *LONG],
        stdin=terminal, stdout=terminal, stderr=terminal, env=env,
    )
    os.close(terminal)
    try:
        assert "/help" in read_until(controller, lambda s: s.endswith("> "))  # the banner, then the prompt
        cancelled = finished_calls(server, "cancelled", "CANCELLED")
        steps = held(server, gate)
        os.write(controller, b"Tell me a long story\n")
        read_until(controller, answer_started)
        assert server.engine.wait_until(lambda s: s.steps == steps and s.active == 1, timeout=30)  # held
        proc.send_signal(signal.SIGINT)
        cancelled_by_the_client(server, finished_calls, cancelled)
        screen = read_until(controller, lambda s: "interrupted · " in s and s.endswith("> "))
        assert "interrupted · TTFT " in screen
        os.write(controller, b"/help\n")
        assert "/reset" in read_until(controller, lambda s: s.endswith("> "))
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(controller)
