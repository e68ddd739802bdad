"""The Node.js client in clients/node (@grpc/grpc-js, proto loaded at run time), against the real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

NODE_CLIENT = Path(__file__).resolve().parents[2] / "clients" / "node"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed"),
    pytest.mark.skipif(not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir(),
                       reason="clients/node/node_modules is missing: run `npm ci` in clients/node"),
]


def generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NODE), str(NODE_CLIENT / "generate.js"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_generate_streams_deltas_and_a_summary(server: Any, loaded_model: Any) -> None:
    prompt = "你好世界 Hello"
    done = generate(server.target, prompt, "--max-new-tokens", "12", "--request-id", "node-1")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    deltas, summary = lines[:-1], lines[-1]
    assert {d["type"] for d in deltas} == {"delta"} and summary["type"] == "summary"
    ids = [i for d in deltas for i in d["token_ids"]]
    text = "".join(d["text"] for d in deltas)
    assert text == loaded_model.tokenizer.decode(ids) == summary["text"]
    assert summary["token_ids"] == ids and len(ids) == 12
    assert summary["finish_reason"] == "MAX_TOKENS"
    assert summary["usage"] == {"prompt_tokens": len(loaded_model.tokenizer.encode(prompt)), "completion_tokens": 12}
    assert summary["request_id"] == "node-1" and summary["seed"] is None  # greedy: no seed


def test_generate_error_exit_code(server: Any) -> None:
    done = generate(server.target, "Hello", "--max-new-tokens", "0")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: INVALID_ARGUMENT: ") and "stopping.max_new_tokens" in done.stderr
