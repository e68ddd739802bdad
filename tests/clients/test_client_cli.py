"""The tokenstream CLI against the real server."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.ports import free_port
from tests.support.tty import FakeTTY
from tokenstream_client.cli import main

PROMPT = "Once upon a time"
CLIENTS = Path(__file__).resolve().parents[2] / "clients"


def run(*argv: str, tty: bool = False) -> tuple[int, str, str]:
    out, err = (FakeTTY(), FakeTTY()) if tty else (io.StringIO(), io.StringIO())
    code = main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_generate_json_lines(server: Any, loaded_model: Any) -> None:
    code, out, err = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "10", "--json",
                         "--request-id", "cli-req-1")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    final = records[-1]
    assert [r["finish_reason"] for r in records[:-1]] == [None] * (len(records) - 1)
    assert final["finish_reason"] == "MAX_TOKENS" and final["request_id"] == "cli-req-1"
    ids = [i for r in records for i in r["token_ids"]]
    assert final["usage"] == {"prompt_tokens": len(loaded_model.tokenizer.encode(PROMPT)), "completion_tokens": 10}
    assert len(ids) == 10 and "".join(r["text"] for r in records) == loaded_model.tokenizer.decode(ids)
    assert set(final["timings"]) == {"queue_ms", "time_to_first_token_ms", "decode_ms", "total_ms"}


def test_generate_prints_the_text(server: Any, loaded_model: Any) -> None:
    code, out, err = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "10")
    assert code == 0 and err == ""
    _, json_out, _ = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "10", "--json")
    assert out == "".join(json.loads(line)["text"] for line in json_out.splitlines())  # greedy: the same text


def test_generate_echoes_the_prompt_tokens(server: Any, loaded_model: Any) -> None:
    code, out, _ = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "2", "--json",
                       "--echo-prompt-tokens")
    first = json.loads(out.splitlines()[0])
    assert code == 0
    assert first["prompt_token_ids"] == loaded_model.tokenizer.encode(PROMPT)


def test_generate_on_a_terminal_shows_a_status_line(server: Any) -> None:
    code, out, err = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "12", tty=True)
    assert code == 0 and out.endswith("\n")
    summary = err.rstrip("\n").rpartition("\n")[2].rpartition("\r\x1b[K")[2]
    assert summary.startswith("MAX_TOKENS · TTFT ") and "12 tokens" in summary and "tok/s" in summary


def test_generate_status_is_redrawn_when_stdout_is_not_the_terminal(server: Any) -> None:
    code, out, err = run("generate", PROMPT, "--target", server.target, "--max-new-tokens", "6", "--status")
    assert code == 0 and "\r" not in out
    assert err.count("\r\x1b[K") >= 6 and "TTFT" in err and err.endswith("\n")


def test_generate_error_exit_code_and_field_violations(server: Any) -> None:
    code, out, err = run("generate", PROMPT, "--target", server.target, "--top-p", "2", "--stop", "")
    assert code == 1 and out == ""
    assert err.startswith("error: INVALID_ARGUMENT: ")
    assert "  sampling.top_p: must be in (0, 1]" in err and "stopping.stop_sequences[0]" in err
    code, out, err = run("generate", PROMPT, "--target", server.target, "--top-p", "2", "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "INVALID_ARGUMENT"


def test_unreachable_server(server: Any) -> None:
    target = f"127.0.0.1:{free_port()}"
    code, _, err = run("generate", PROMPT, "--target", target, "--max-attempts", "1", "--timeout", "5")
    assert code == 1 and "error: UNAVAILABLE: " in err
    code, _, err = run("health", "--target", target)
    assert code == 1 and "UNAVAILABLE" in err


def test_tokenize(server: Any, loaded_model: Any) -> None:
    code, out, _ = run("tokenize", "Hello world", "--target", server.target, "--json")
    assert code == 0 and json.loads(out)["ids"] == loaded_model.tokenizer.encode("Hello world")
    code, out, _ = run("tokenize", "Hello world", "--target", server.target)
    count, ids = out.splitlines()
    assert count == "2 tokens" and [int(i) for i in ids.split()] == loaded_model.tokenizer.encode("Hello world")
    code, out, _ = run("tokenize", "Hello world", "--target", server.target, "--tokens")
    assert code == 0 and out.splitlines()[2].endswith("[5, 11)")


def test_info_and_health(server: Any) -> None:
    code, out, _ = run("info", "--target", server.target, "--json")
    assert code == 0 and json.loads(out)["vocab_size"] == 151_936
    code, out, _ = run("info", "--target", server.target)
    assert code == 0 and "vocab_size" in out
    assert run("health", "--target", server.target) == (0, "SERVING\n", "")
    assert run("health", "--target", server.target, "--service", "no.such.Service")[0] == 1


def test_module_entry_point(server: Any) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CLIENTS), *sys.path])
    done = subprocess.run(
        [sys.executable, "-m", "tokenstream_client", "generate", PROMPT, "--target", server.target,
         "--max-new-tokens", "3", "--json"],
        check=False, capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["finish_reason"] == "MAX_TOKENS"
