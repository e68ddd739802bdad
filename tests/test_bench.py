"""Smoke runs of every bench entry point: each runs in its own process at its smallest settings, on the tiny random
model, and must exit 0 and write its output. Nothing about speed is asserted (the figures of a smoke run mean
nothing): this only keeps a bench that crashes from passing CI.

Not covered: bench.peers_llamacpp, which runs the SmolLM2 GGUF only (its F32 conversion and the HF directory its
tokenizer comes from take minutes the first time); `make bench PEERS=llamacpp` runs it. The prefix phase's
llama-server part (bench.multiturn llamacpp) is covered, on the shipped Q4_1 SmolLM2 file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import REPO, bench_env, random_model_dir
from tests.gguf_files import llamacpp_bin, smollm2_file

TIMEOUT_S = 420


@pytest.fixture(scope="module")
def tiny() -> Path:
    return random_model_dir("tiny")


def run(*args: str, timeout: float = TIMEOUT_S) -> str:
    """Run `python ARGS` from the repository root as the bench runs its phases; fail with its output on error."""
    env = bench_env()
    env["TOKENSTREAM_BENCH_IDLE"] = "1,0"  # never wait for an idle machine: nothing is timed for real
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                 f"{done.stderr[-5000:]}"
    return done.stdout


def read_json(path: Path) -> dict:
    assert path.exists(), f"{path} was not written"
    return json.loads(path.read_text())


def test_run_and_report(tiny: Path, tmp_path: Path) -> None:
    """bench.run with every phase of a random model (server, in-process sweep, steps, profile, GIL, RSS, arrivals,
    sequence, prefix reuse, the paddleformers peer), its table and charts; then --report on its results."""
    out = run("-m", "bench.run", "--smoke", "--models", "tiny", "--idle", "1,0", "--out", str(tmp_path),
              "--charts", str(tmp_path / "charts"))
    results = sorted(tmp_path.glob("*-smoke.json"))
    assert len(results) == 1
    res = read_json(results[0])["models"]["tiny"]
    for phase in ("inproc", "constrained", "arrivals", "sequence", "prefix", "paddleformers"):
        assert res.get(phase), f"phase {phase} left no results: {out[-2000:]}"
        assert res[phase]["_meta"]["rc"] == 0, phase
    assert set(res["inproc"]) >= {"sweep", "steps", "profile", "gil"}
    assert sorted(p.name for p in (tmp_path / "charts").glob("*.png")) == ["arrivals-tiny.png", "prefix-tiny.png",
                                                                          "throughput-tiny.png"]
    report = run("-m", "bench.run", "--report", str(results[0]), "--charts", "")
    assert "Targets:" in report
    assert "tiny:prefix: turn 3 / turn 1=" in report
    assert "tiny:prefix: turn 3 on / off=" in report


@pytest.fixture(scope="module")
def prefix_only(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`bench.run --smoke --only prefix` on the tiny model: the results of its one model."""
    out = tmp_path_factory.mktemp("prefix")
    run("-m", "bench.run", "--smoke", "--models", "tiny", "--only", "prefix", "--idle", "1,0", "--out", str(out),
        "--charts", str(out / "charts"))
    results = sorted(out.glob("*-smoke.json"))
    assert len(results) == 1
    return read_json(results[0])["models"]["tiny"]


def test_run_only_prefix(prefix_only: dict) -> None:
    """--only prefix runs the prefix phase and nothing else: no main server, no peers."""
    assert prefix_only["prefix"]["_meta"]["rc"] == 0
    assert not {"inproc", "constrained", "arrivals", "sequence", "rss", "paddleformers"} & set(prefix_only)


def test_prefix_phase_servers(prefix_only: dict) -> None:
    """The prefix phase's three servers are what its table says: reuse on reuses a chat's earlier turns, off never
    does, both give the same greedy replies; shared scope lets callers reuse the first caller's system prompt, the
    default per-caller scope does not."""
    prefix = prefix_only["prefix"]
    assert [p["scope"] for p in prefix["policy"].values()] == ["caller", "shared", "caller"]
    assert prefix["policy"]["off"]["budget_bytes"] == 0 < prefix["policy"]["on"]["budget_bytes"]
    on, off = prefix["chat"]["on"][0], prefix["chat"]["off"][0]
    assert [r["turn"] for r in on] == [1, 2, 3]
    assert on[-1]["cached"] >= prefix["policy"]["on"]["block_positions"]
    assert [r["cached"] for r in off] == [0, 0, 0]
    assert [r["ids"] for r in on] == [r["ids"] for r in off]
    callers = {name: rounds[0] for name, rounds in prefix["callers"].items()}
    assert [r["caller"] for r in callers["shared"]] == [0, 1, 2]
    assert callers["shared"][0]["cached"] == 0
    assert min(r["cached"] for r in callers["shared"][1:]) >= prefix["policy"]["shared"]["block_positions"]
    assert [r["cached"] for r in callers["on"]] == [0, 0, 0]
    assert [r["cached"] for r in callers["off"]] == [0, 0, 0]


def test_prefix_llamacpp(prefix_only: dict, tmp_path: Path) -> None:
    """The prefix phase's llama-server part (bench.multiturn llamacpp) replays the smoke's chat with cache_prompt:
    every turn after the first reuses more than the previous turn's prompt (its reply is in the next prompt)."""
    script = tmp_path / "tiny-prefix.json"
    script.write_text(json.dumps(prefix_only["prefix"]))
    result = tmp_path / "prefix-llamacpp.json"
    run("-m", "bench.multiturn", "llamacpp", "--script", str(script), "--bin", str(llamacpp_bin()), "--gguf",
        str(smollm2_file()), "--threads", "1", "--out", str(result))
    chat = read_json(result)["chat"]
    assert [r["turn"] for r in chat[0]] == [1, 2, 3]
    for before, turn in zip(chat[0], chat[0][1:], strict=False):
        assert turn["cached"] > before["prompt_tokens"], turn


def test_profile_step(tiny: Path, tmp_path: Path) -> None:
    """Every part of bench.profile_step, with every kind of path: the old revision from git ('orig'), a
    DecoderOptions variant, the broadcast mask, the Paddle Inference step (bench/levers/static_step.py)."""
    out = tmp_path / "profile.json"
    run("-m", "bench.profile_step", "--model-dir", str(tiny), "--batches", "1,2", "--reps", "1", "--length", "20",
        "--parts", "check,bandwidth,steps,breakdown,prefill,resize,engine,arrivals", "--bandwidth-mb", "8",
        "--paths", "fast,plain,orig,broadcast_mask,t1,fused_gate_up,static1", "--breakdown-paths", "fast,orig",
        "--json", str(out))
    res = read_json(out)
    assert {r["path"] for r in res["steps"]["rows"]} == {"fast", "plain", "orig", "broadcast_mask", "t1",
                                                         "fused_gate_up", "static1"}
    assert res["check"]["greedy_agree"]
    assert set(res) >= {"bandwidth", "breakdown_fast", "breakdown_orig", "prefill", "resize", "engine", "arrivals"}


def test_lever_true_lengths(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "true_lengths.json"
    run("-m", "bench.levers.true_lengths", "--model-dir", str(tiny), "--cases", "u85_1,mixed8", "--reps", "1",
        "--json", str(out))
    res = read_json(out)
    assert any(r["path"].startswith("before@") for r in res["steps"]["rows"])  # the old revision, from git
    assert set(res) >= {"layer", "check"}


def test_lever_kernels(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    run("-m", "bench.levers.kernels", "--model-dir", str(tiny), "--batches", "1,2", "--reps", "1", "--length", "8",
        "--json", str(out))
    assert {r["path"] for r in read_json(out)["rows"]} >= {"plain", "plain_path"}


def test_lever_constrained(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "constrained.json"
    run("-m", "bench.levers.constrained", "--model-dir", str(tiny), "--batch", "2", "--reps", "1", "--length", "8",
        "--json", str(out))
    res = read_json(out)
    assert [r["constrained_rows"] for r in res["rows"]] == [0, 1, 2]
    assert res["compile_ms_p50"] > 0


def test_lever_constrained_libraries(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "libraries.json"
    run("-m", "bench.levers.constrained_libraries", "--model-dir", str(tiny), "--reps", "1", "--json", str(out))
    res = read_json(out)
    assert res["llguidance"]["compile_ms_p50"] > 0 and res["outlines_core"]["compile_ms_p50"] > 0


def test_lever_threads(tmp_path: Path) -> None:
    out = tmp_path / "threads.json"
    run("-m", "bench.levers.threads", "--rows", "1", "--pairs", "1", "--json", str(out))
    pairs = read_json(out)["rows"]["1"]
    assert set(pairs) == {"paddle1/paddle2", "paddle1/split2", "numpy1/numpy2"}


def test_lever_threads_serving(tmp_path: Path) -> None:
    out = tmp_path / "threads_serving.json"
    run("-m", "bench.levers.threads_serving", "--model", "tiny", "--rounds", "1", "--streams", "1", "--new-tokens",
        "2", "--variants", "t1,t2", "--json", str(out))
    assert set(read_json(out)["table"]["1"]) == {"t1", "t2"}


def test_http_vs_grpc(tmp_path: Path) -> None:
    out = tmp_path / "http_vs_grpc.json"
    run("-m", "bench.http_vs_grpc", "--streams", "1", "--rounds", "1", "--new-tokens", "2", "--out", str(out))
    assert read_json(out)["summary"]


def test_flood(tmp_path: Path) -> None:
    out = tmp_path / "flood.json"
    run("-m", "bench.flood", "--quick", "--out", str(out))
    res = read_json(out)
    assert res["burst"]["finished"] == res["plan"]["burst_streams"]


def test_peer_transformers(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf.json"
    run("-m", "bench.peers_hf", "--model-dir", str(tiny), "--batches", "1", "--new-tokens", "2", "--out", str(out))
    assert read_json(out)["batches"]


def test_train_demo_smoke(tmp_path: Path) -> None:
    """scripts/train_demo.py --smoke: a tiny model trained a few steps on the pydoc topics, loaded by the engine."""
    out = run("scripts/train_demo.py", "--smoke", "--out", str(tmp_path / "demo"), "--minutes", "3")
    assert "verify: engine vs training forward" in out
    assert (tmp_path / "demo" / "model.safetensors").exists()


def test_lever_prefix_reuse(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "prefix_reuse.json"
    run("-m", "bench.levers.prefix_reuse", "--model-dir", str(tiny), "--turns", "3", "--user-tokens", "40",
        "--reply-tokens", "4", "--json", str(out))
    result = read_json(out)
    assert result["token_identical"] and len(result["rows"]) == 3
    assert result["rows"][-1]["cached_on"] > 0 and result["rows"][-1]["cached_off"] == 0
