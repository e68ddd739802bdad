"""Benchmark entry point: `python -m bench.run [--quick] [--peers llamacpp,hf] [--models smollm2,tiny,base]`
(or `make bench PEERS=llamacpp,hf`).

Runs every measurement in separate processes (our server, the in-process engine with its gRPC client, the load
generator, each peer), prints one table of medians and side-by-side ratios with PASS/MISS per target, writes
bench/results/<stamp>-<mode>.json (raw per-phase JSON and logs in bench/results/<stamp>-<mode>/) and the charts
in bench/charts/. Targets are reported, never asserted. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_MODEL,
    IDLE_DEFAULTS,
    MODELS,
    REPO,
    RESULTS,
    bench_env,
    engine_model_path,
    engines,
    free_port,
    log,
    median,
    param_counts,
    peer_model_dir,
    prefix_summary,
    quiet_run,
    rss_bytes,
    stop_process,
    write_json,
)
from bench.host import cpu_name

PY = sys.executable
PEERS = ("llamacpp", "hf", "paddle")
# What `--only` selects: our main server's phases (RSS, sweep, bound, GIL, structured output, arrivals, sequence),
# prefix reuse (bench/multiturn.py: ours, and llama-server's with --peers llamacpp), the peers' throughput phases.
STAGES = ("server", "prefix", "peers")
MIN_PHASE_S = 120.0  # a phase that starts past the budget still gets this long
# The prefix phase's servers, one model each: reuse on (the default per-caller scope), shared across callers, off.
PREFIX_SERVERS = {"on": [], "shared": ["--prefix-cache-scope", "shared"], "off": ["--prefix-cache-mb", "0"]}
CALLER_KEY = "x-bench-caller"  # they take each caller's name from this metadata key, trusted from 127.0.0.1
CALLER_CASES = (("shared", "shared"), ("on", "per-caller"), ("off", "off"))  # the servers as the callers see them


# -- plans -----------------------------------------------------------------------------------------

SMOKE = {"sweep": [1, 2], "new_tokens": 4, "rounds": 1, "ratio_rounds": 1, "arrivals_requests": 1,
         "inproc_parts": "sweep,steps,profile,gil", "step_length": 16, "reps": 1, "iter_steps": 2, "gil_seconds": 0.2,
         "llamacpp_variants": "f32", "bench_reps": 0, "rss_requests": 8, "rss_warmup": 8, "rss_new_tokens": 2,
         "naive": [4], "seq_rounds": 1, "streamer_requests": 1,
         "prefix": {"conversations": 1, "turns": 3, "user_tokens": 24, "reply_tokens": 4, "callers": 3,
                    "caller_rounds": 1, "system_tokens": 64, "question_tokens": 8, "caller_reply_tokens": 2}}
# The prefix phase (issue #23): chats of 10 turns growing by ~150 tokens a turn to ~1,500; 8 callers, 600-token system.
PREFIX = {"conversations": 3, "turns": 10, "user_tokens": 120, "reply_tokens": 30, "callers": 8, "caller_rounds": 2,
          "system_tokens": 600, "question_tokens": 40, "caller_reply_tokens": 8}


def plan_for(model: str, quick: bool, smoke: bool = False) -> dict[str, Any]:
    common = {"arrivals_stagger_s": 0.2, "arrivals_jitter": 0.25, "max_slots": 32,
              "prefix": {**PREFIX, "conversations": 1, "caller_rounds": 1} if quick else PREFIX}
    if smoke:  # every phase once, as small as it goes: that the harness runs (`make test`), no figures
        return {**common, **SMOKE}
    if model == "smollm2":
        if quick:
            return {**common, "sweep": [1, 8, 32], "new_tokens": 64, "rounds": 1, "ratio_rounds": 1,
                    "arrivals_requests": 2, "inproc_parts": "sweep,steps", "step_length": 128, "reps": 3,
                    "iter_steps": 6, "gil_seconds": 0, "llamacpp_variants": "f32", "bench_reps": 2,
                    "rss_requests": 0, "naive": [], "streamer_requests": 0}
        return {**common, "sweep": [1, 4, 8, 16, 32], "new_tokens": 128, "rounds": 1, "ratio_rounds": 3,
                "arrivals_requests": 3, "inproc_parts": "sweep,steps,gil", "step_length": 128, "reps": 5,
                "iter_steps": 10, "gil_seconds": 2.0, "llamacpp_variants": "f32,q4_1", "bench_reps": 5,
                "rss_requests": 0, "naive": [], "streamer_requests": 0}
    if model == "tiny":
        return {**common, "sweep": [1, 4, 8, 16, 32], "new_tokens": 32 if quick else 64, "rounds": 1,
                "ratio_rounds": 3 if quick else 5, "arrivals_requests": 3,
                "naive": [64] if quick else [64, 128, 256], "seq_rounds": 2 if quick else 1, "streamer_requests": 8,
                "rss_requests": 1000, "rss_warmup": 96, "rss_new_tokens": 2,
                "step_length": 128, "reps": 4 if quick else 6, "iter_steps": 12, "gil_seconds": 1.5 if quick else 2.0,
                "inproc_parts": "sweep,steps,profile,gil"}
    return {**common, "sweep": [1, 4, 8, 16, 32], "new_tokens": 32, "rounds": 1, "ratio_rounds": 3,
            "arrivals_requests": 2, "naive": [32], "seq_rounds": 2, "streamer_requests": 8,
            "rss_requests": 0, "step_length": 64, "reps": 3, "iter_steps": 5, "gil_seconds": 2.0,
            "inproc_parts": "sweep,steps,profile,gil"}


# -- processes -------------------------------------------------------------------------------------

class Server:
    def __init__(self, model_dir: Path, logdir: Path, name: str, extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = open(logdir / f"server-{name}.log", "w")  # noqa: SIM115
        cmd = [PY, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--model-dir", str(model_dir),
               "--max-slots", "32", "--max-context", "2048", "--max-queue", "64", "--max-new-tokens-limit", "2048",
               "--grace-s", "1", *(extra or [])]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=bench_env(), stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 300.0) -> float:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        t0 = time.monotonic()
        with grpc.insecure_channel(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() - t0 < timeout:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.monotonic() - t0
                except grpc.RpcError:
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"server not SERVING after {timeout} s")

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def run_py(module: str, args: list[str], out: Path, logdir: Path, timeout: float) -> dict[str, Any] | None:
    """Run `python -m module args --out out`; return its JSON, or None (and log why) on failure or timeout."""
    name = out.stem
    t = time.monotonic()
    rc: int | str
    with open(logdir / f"{name}.log", "w") as lf:
        try:
            rc = subprocess.run([PY, "-m", module, *args, "--out", str(out)], cwd=REPO, env=bench_env(),
                                stdout=lf, stderr=subprocess.STDOUT, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    dt = time.monotonic() - t
    if rc != 0:
        log(f"  {name}: FAILED ({rc}) after {dt:.0f} s; see {logdir / (name + '.log')}")
    else:
        log(f"  {name}: {dt:.0f} s")
    if out.exists():
        data = json.loads(out.read_text())
        data.setdefault("_meta", {}).update(rc=rc, seconds=dt)
        return data
    return None


def load_phase(server: Server, out: Path, logdir: Path, timeout: float, **kw: Any) -> dict[str, Any] | None:
    args = ["--target", server.target, "--server-pid", str(server.pid)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            if v:
                args.append(flag)
        elif isinstance(v, list):
            args += [flag, *map(str, v)]
        else:
            args += [flag, str(v)]
    return run_py("bench.load", args, out, logdir, timeout)


# -- one model -------------------------------------------------------------------------------------

def prepare(key: str, peers: set[str]) -> dict[str, Any]:
    """Everything built once and cached (model conversion, the llama.cpp build, its F32 GGUF): not timed."""
    t = time.monotonic()
    out: dict[str, Any] = {"engine_model": str(engine_model_path(key)), "peer_model_dir": str(peer_model_dir(key))}
    if "llamacpp" in peers and MODELS[key].source == "smollm2":
        from bench.common import smollm2_gguf
        from bench.peers_llamacpp import build, f32_gguf

        bin_dir = build()
        out["llamacpp_bin"] = str(bin_dir)
        out["f32_gguf"] = str(f32_gguf(bin_dir, smollm2_gguf()))
    out["seconds"] = time.monotonic() - t
    return out


def bench_model(key: str, quick: bool, peers: set[str], raw: Path, budget_end: float,
                smoke: bool = False, stages: set[str] | None = None) -> dict[str, Any]:
    stages = set(STAGES) if stages is None else stages
    plan = plan_for(key, quick, smoke)
    res: dict[str, Any] = {"model": key, "params": param_counts(key), "plan": plan}
    res["prepare"] = prepare(key, peers)
    log(f"[{key}] prepared in {res['prepare']['seconds']:.0f} s: {res['prepare']['engine_model']}")
    budget_end += res["prepare"]["seconds"]  # building is not benchmarking
    mdir = Path(res["prepare"]["engine_model"])
    pdir = Path(res["prepare"]["peer_model_dir"])
    n = plan["new_tokens"]
    left = lambda: max(MIN_PHASE_S, budget_end - time.monotonic())  # noqa: E731
    random_model = MODELS[key].source == "random"

    if "server" in stages:
        server_phases(key, res, mdir, raw, left)

    if "prefix" in stages:
        res.update(prefix_phase(key, mdir, plan["prefix"], res["prepare"], peers, raw, left))
    if "peers" not in stages:
        peers = set()
    if "hf" in peers:
        res["hf"] = run_py("bench.peers_hf", [
            "--model-dir", str(pdir), "--new-tokens", str(n), "--batches", *map(str, plan["sweep"]),
        ], raw / f"{key}-hf.json", raw, left())
    if "llamacpp" in peers:
        if random_model:
            log(f"[{key}] llama.cpp peer: skipped (it runs the SmolLM2 GGUF only)")
        else:
            res["llamacpp"] = run_py("bench.peers_llamacpp", [
                "--model-dir", str(pdir), "--variants", plan["llamacpp_variants"], "--new-tokens", str(n),
                "--concurrency", *map(str, plan["sweep"]), "--bench-reps", str(plan["bench_reps"]),
                "--arrivals-requests", str(plan["arrivals_requests"]),
                "--stagger-s", str(plan["arrivals_stagger_s"]), "--jitter", str(plan["arrivals_jitter"]),
            ], raw / f"{key}-llamacpp.json", raw, left())
    if "paddle" in peers or (random_model and "peers" in stages):
        if not random_model:
            log(f"[{key}] paddleformers peer: skipped (its Qwen2 tokenizer path fits the random models only)")
        else:
            res["paddleformers"] = run_py("bench.peers_paddle", [
                "--model-dir", str(pdir), "--naive", *map(str, plan["naive"]),
                "--streamer", str(plan["streamer_requests"]), "--new-tokens", str(n),
            ], raw / f"{key}-paddleformers.json", raw, left())
    res["agreement"] = agreement(res)
    return res


def server_phases(key: str, res: dict[str, Any], mdir: Path, raw: Path, left: Any) -> None:
    """Everything timed against our main server (RSS, the sweep, the bound, GIL, structured output, arrivals,
    the sequence), into `res`."""
    plan = res["plan"]
    n = plan["new_tokens"]
    server = Server(mdir, raw, key)
    try:
        res["server_ready_s"] = server.wait_ready()
        res["rss_ready"] = rss_bytes(server.pid)
        log(f"[{key}] server pid {server.pid} on {server.target} ready in {res['server_ready_s']:.0f} s")

        if plan["rss_requests"]:
            per = 8
            load_phase(server, raw / f"{key}-rss-warmup.json", raw, left(), kind="closed", concurrency=per,
                       requests=plan["rss_warmup"] // per, new_tokens=plan["rss_new_tokens"], warmup=True)
            before = rss_bytes(server.pid)
            main = load_phase(server, raw / f"{key}-rss-main.json", raw, left(), kind="closed", concurrency=per,
                              requests=plan["rss_requests"] // per, new_tokens=plan["rss_new_tokens"])
            after = rss_bytes(server.pid)
            res["rss"] = {"before": before, "after": after, "growth": (after - before) / before,
                          "requests": (main or {}).get("requests"), "finishes": (main or {}).get("finishes"),
                          "requests_per_s": ((main or {}).get("requests") or 0) / ((main or {}).get("wall_s") or 1)}

        # The sweep (in-process and gRPC, alternated), the decode-step bound, the GIL probe: one process.
        res["inproc"] = run_py("bench.inproc", [
            "--model-dir", str(mdir), "--target", server.target, "--server-pid", str(server.pid),
            "--parts", plan["inproc_parts"],
            "--new-tokens", str(n), "--rounds", str(plan["rounds"]), "--ratio-rounds", str(plan["ratio_rounds"]),
            "--length", str(plan["step_length"]), "--iter-steps", str(plan["iter_steps"]),
            "--reps", str(plan["reps"]), "--gil-seconds", str(plan["gil_seconds"]),
            "--max-slots", str(plan["max_slots"]), "--batches", *map(str, plan["sweep"]),
        ], raw / f"{key}-inproc.json", raw, left())

        # Structured output's cost: the step with 0, 1 and all rows constrained, and a typical schema's compile time.
        res["constrained"] = run_py("bench.levers.constrained", [
            "--model-dir", str(mdir), "--batch", str(min(8, plan["max_slots"])), "--length", str(plan["step_length"]),
            "--reps", str(max(3, 4 * plan["reps"])),
        ], raw / f"{key}-constrained.json", raw, left())

        # Requests arriving at 8 streams: long prompts, starts stagger_s apart, lengths +-jitter, closed loop.
        res["arrivals"] = load_phase(server, raw / f"{key}-arrivals-c8.json", raw, left(), kind="arrivals",
                                     concurrency=8, requests=plan["arrivals_requests"], new_tokens=n,
                                     prompts="long", stagger_s=plan["arrivals_stagger_s"],
                                     jitter=plan["arrivals_jitter"], warmup=True)

        if MODELS[key].source == "random" and plan["naive"]:
            lengths = sorted(set(plan["naive"]) | {n})
            res["sequence"] = load_phase(server, raw / f"{key}-sequence.json", raw, left(), kind="sequence",
                                         lengths=lengths, requests=plan["seq_rounds"], warmup=True)
        res["rss_end"] = rss_bytes(server.pid)
    finally:
        server.stop()


def prefix_phase(key: str, mdir: Path, plan: dict[str, Any], prep: dict[str, Any], peers: set[str], raw: Path,
                 left: Any) -> dict[str, Any]:
    """Prefix reuse (bench/multiturn.py): our three servers (PREFIX_SERVERS) started together, the chats and the
    callers over gRPC; then llama-server with its prompt cache on the same chats, with --peers llamacpp."""
    trust = ["--caller-key", CALLER_KEY, "--trusted-proxies", "127.0.0.1"]
    servers = {n: Server(mdir, raw, f"{key}-prefix-{n}", trust + extra) for n, extra in PREFIX_SERVERS.items()}
    out: dict[str, Any] = {}
    ours = raw / f"{key}-prefix.json"
    try:
        for srv in servers.values():
            srv.wait_ready()
        args = ["ours", "--targets", *(f"{n}={srv.target}" for n, srv in servers.items()), "--caller-key",
                CALLER_KEY, "--server-pid", *(str(srv.pid) for srv in servers.values())]
        args += [a for k, v in plan.items() for a in (f"--{k.replace('_', '-')}", str(v))]
        out["prefix"] = run_py("bench.multiturn", args, ours, raw, left())
    finally:
        for srv in servers.values():
            srv.stop()
    if "llamacpp" not in peers:
        return out
    if not prep.get("f32_gguf"):
        log(f"[{key}] llama-server's prefix reuse: skipped (it runs the SmolLM2 GGUF only)")
    elif not out["prefix"]:
        log(f"[{key}] llama-server's prefix reuse: skipped (our phase wrote no chats to replay)")
    else:
        out["prefix_llamacpp"] = run_py("bench.multiturn", [
            "llamacpp", "--script", str(ours), "--bin", prep["llamacpp_bin"], "--gguf", prep["f32_gguf"],
        ], raw / f"{key}-prefix-llamacpp.json", raw, left())
    return out


# -- derived figures -------------------------------------------------------------------------------

def agreement(res: dict[str, Any]) -> dict[str, Any]:
    """Greedy token agreement: every engine's outputs against ours in-process at the same prompt.

    The reference for prompt i is our in-process engine's stream for it at 8 streams (or the smallest batch that
    has it); greedy output does not depend on the batch in our engine, which the in-process rows check too.
    """
    eng = engines(res)
    ours = eng.get("tokenstream, in-process") or {}
    ref: dict[int, tuple[str, list[int]]] = {}  # prompt -> (concurrency it came from, ids)
    for c in sorted(ours, key=lambda c: (c != "8", int(c))):
        for o in ours[c].get("outputs") or []:
            ref.setdefault(o["prompt"], (c, o["ids"]))
    out: dict[str, Any] = {"reference": "tokenstream, in-process at 8 streams (prompts not in it: smallest batch)"}
    if not ref:
        return out
    for label, runs in eng.items():
        streams = same = 0
        first_diff: int | None = None
        for c, run in runs.items():
            for o in run.get("outputs") or []:
                rc, r = ref.get(o["prompt"], ("", None))
                if r is None or (label == "tokenstream, in-process" and c == rc):
                    continue  # our in-process rows check batch invariance: other batch sizes only
                streams += 1
                if o["ids"] == r:
                    same += 1
                else:
                    k = next((i for i, (a, b) in enumerate(zip(o["ids"], r, strict=False)) if a != b),
                             min(len(o["ids"]), len(r)))
                    first_diff = k if first_diff is None else min(first_diff, k)
                    out.setdefault("diverged", []).append({"engine": label, "streams": c, "prompt": o["prompt"],
                                                            "at": k})
        out[label] = {"streams": streams, "identical": same, "first_divergence": first_diff}
    out["tokenstream, in-process"]["note"] = "other batch sizes than the reference"
    return out


# -- report ----------------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def tps(run: dict[str, Any] | None) -> float | None:
    return None if not run else run.get("tokens_per_s")


def div(a: float | None, b: float | None) -> float | None:
    """a / b, or None where either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def busy_mark(run: dict[str, Any] | None) -> str:
    return "~" if quiet_run(run or {}) is False else ""


def describe(key: str) -> str:
    m = MODELS[key]
    p = param_counts(key)
    return (f"{key}: {m.description}; Llama {m.num_layers} layers, hidden {m.hidden_size}, heads "
            f"{m.num_heads}/{m.num_kv_heads}, vocabulary {m.vocab_size}, {p['total'] / 1e6:.1f}M params "
            f"({p['layers'] / 1e6:.1f}M in layers + {p['embedding_tied'] / 1e6:.1f}M tied embedding), fp32")


def throughput_tables(res: dict[str, Any], eng: dict[str, dict[str, dict[str, Any]]], w: Any) -> None:
    """The engines' table at 1, 8 and 32 streams, and every engine at every concurrency."""
    n = res["plan"]["new_tokens"]
    ours, grpc_ = eng.get("tokenstream, in-process") or {}, eng.get("tokenstream over gRPC") or {}
    hf = eng.get("transformers generate()") or {}
    lc = res.get("llamacpp") or {}
    lcf, lcq = lc.get("f32") or {}, lc.get("q4_1") or {}
    prompt_tokens = ((((res.get("inproc") or {}).get("sweep")) or {}).get("prompt_tokens")) or []
    w(f"greedy, {min(prompt_tokens, default=0)}-{max(prompt_tokens, default=0)}-token prompts, {n} new tokens "
      "per stream (end-of-sequence suppressed), every engine on the same weights and prompt ids; "
      "N streams started together, aggregate tok/s = all tokens / wall time.")
    w("")

    def cell(run: dict[str, Any] | None, step_ms: float | None = None) -> str:
        if not run or tps(run) is None:
            return "-"
        s = f"{tps(run):.1f}{busy_mark(run)}"
        return s + (f" ({step_ms:.1f} ms/step)" if step_ms else "")

    def step(run: dict[str, Any] | None) -> float | None:
        return ((run or {}).get("itl_ms") or {}).get("p50")

    rows = [("tokenstream engine, in-process", ours), ("tokenstream server over gRPC (client in another process)",
                                                           grpc_)]
    if hf:
        h = res.get("hf") or {}
        rows.append((f"transformers {h.get('transformers', '')} + torch {h.get('torch', '')} CPU, `generate()` "
                     "(fixed batch, left-padded)", hf))
    w("| engine | batch 1 tok/s | 8 streams, aggregate tok/s | 32 streams, aggregate tok/s |")
    w("|---|---|---|---|")
    for label, runs in rows:
        w(f"| {label} | {cell(runs.get('1'), step(runs.get('1')))} | {cell(runs.get('8'), step(runs.get('8')))}"
          f" | {cell(runs.get('32'), step(runs.get('32')))} |")
    for v, label in ((lcf, "llama.cpp F32 (`llama-bench` at batch 1; `llama-server -np N` for streams)"),
                     (lcq, "llama.cpp with the shipped Q4_1 weights")):
        if not v:
            continue
        b = v.get("bench") or {}
        srv = v.get("server") or {}
        first = f"{b['tokens_per_s']:.1f}{busy_mark(b)} ({b['ms_per_token']:.1f} ms)" if b else cell(srv.get("1"))
        w(f"| {label} | {first} | {cell(srv.get('8'))} | {cell(srv.get('32'))} |")
    w("")

    # Every engine at every concurrency.
    cs = [str(c) for c in res["plan"]["sweep"]]
    w("aggregate tok/s by concurrent streams (~ = not quiet: the machine was busy before that timing, or other "
      "processes took CPU during it):")
    w(f"  {'engine':<32}" + "".join(f"{c:>12}" for c in cs))
    for label, runs in eng.items():
        w(f"  {label:<32}" + "".join(f"{cell(runs.get(c)):>12}" for c in cs))
    for what in ("ttft_ms", "itl_ms"):
        def pair(c: str, what: str = what, runs: dict[str, Any] = grpc_) -> str:
            s = (runs.get(c) or {}).get(what) or {}
            return f"{f(s.get('p50'), '.0f')}/{f(s.get('p99'), '.0f')}"
        label = f"(ours over gRPC) {what[:-3].upper()} p50/p99 ms"
        w(f"  {label:<32}" + "".join(f"{pair(c):>12}" for c in cs))
    w("")


def prefix_report(key: str, res: dict[str, Any], w: Any, check: Any) -> None:
    """The prefix phase's table (bench/multiturn.py): TTFT per turn with reuse on, off and llama-server's prompt
    cache; the issue's goals at the last turn; the callers sharing a system prompt."""
    s = prefix_summary(res)
    if not s or not s["turns"]:
        return
    ours, llama = res["prefix"], res.get("prefix_llamacpp") or {}
    p = ours["plan"]
    w(f"Prefix reuse (issue #23): {p['conversations']} chat(s) of {p['turns']} turns over gRPC, each turn the previous "
      f"prompt + its reply ({p['reply_tokens']} tokens, greedy, EOS suppressed) + {p['user_tokens']} user tokens; "
      "our servers with reuse on and off alternated request by request"
      + (f"; llama-server F32 with cache_prompt (`{llama['cmd']}`) on the same turns" if llama.get("cmd") else "")
      + ". Median client TTFT per turn (~ = not quiet):")
    w(f"  {'turn':>4} {'prompt':>6} {'cached':>6} {'on ms':>9} {'off ms':>9} {'on/off':>6} {'llama ms':>9} "
      f"{'cached':>6} {'on/llama':>8}")

    def ms(cell: dict[str, Any] | None) -> str:
        return "-" if not cell else f"{cell['ttft_ms']:.0f}{'' if cell['quiet'] else '~'}"

    def ttft(cell: dict[str, Any] | None) -> float | None:
        return (cell or {}).get("ttft_ms")

    for row in s["turns"]:
        on, off, lm = row.get("on"), row.get("off"), row.get("llama")
        w(f"  {row['turn']:>4} {f((on or {}).get('prompt_tokens'), '.0f'):>6} {f((on or {}).get('cached'), '.0f'):>6} "
          f"{ms(on):>9} {ms(off):>9} {f(div(ttft(on), ttft(off)), '.2f'):>6} {ms(lm):>9} "
          f"{f((lm or {}).get('cached'), '.0f'):>6} {f(div(ttft(on), ttft(lm)), '.2f'):>8}")
    first, last = s["turns"][0], s["turns"][-1]
    t = last["turn"]
    growth = div(ttft(last.get("on")), ttft(first.get("on")))
    w(f"  turn {t} / turn 1 with reuse on: {f(ttft(last.get('on')), '.0f')} / {f(ttft(first.get('on')), '.0f')} ms = "
      f"{f(growth, '.2f')}x  [target <= 1.5: {check(key, f'prefix: turn {t} / turn 1', growth, '<= 1.5', lambda x: x <= 1.5)}]")  # noqa: E501
    saved = div(ttft(last.get("on")), ttft(last.get("off")))
    w(f"  turn {t} reuse on / off: {f(ttft(last.get('on')), '.0f')} / {f(ttft(last.get('off')), '.0f')} ms = "
      f"{f(saved, '.2f')}x  [target <= 0.25: {check(key, f'prefix: turn {t} on / off', saved, '<= 0.25', lambda x: x <= 0.25)}]")  # noqa: E501
    if last.get("llama"):
        w(f"  turn {t} ours (reuse on) / llama-server (cache_prompt): {f(ttft(last.get('on')), '.0f')} / "
          f"{f(ttft(last['llama']), '.0f')} ms = {f(div(ttft(last.get('on')), ttft(last['llama'])), '.2f')}x; turn 1: "
          f"{f(div(ttft(first.get('on')), ttft(first.get('llama'))), '.2f')}x  (reported; the issue sets no bound)")
    same, pairs = s["on_off_identical"]
    line = f"  greedy replies: reuse on = off in {same}/{pairs} turns"
    if s["llama_identical"][1]:
        line += (f"; llama-server's = ours in {s['llama_identical'][0]}/{s['llama_identical'][1]} (its prompt token "
                 f"counts = ours in {s['llama_same_prompt_tokens'][0]}/{s['llama_same_prompt_tokens'][1]})")
    w(line)
    c = s["callers"]
    if c:
        w(f"  {p['callers']} callers sharing a {p['system_tokens']}-token system prompt, {p['caller_rounds']} round(s) "
          f"(a new system prompt each; callers one after another, {p['question_tokens']}-token question, "
          f"{p['caller_reply_tokens']} new tokens): median client TTFT ms (cached tokens)")
        for part, label in (("first", "first caller"), ("others", f"callers 2-{p['callers']}")):
            cells = ", ".join(f"{label2} {ms(c[name][part])} ({f(c[name][part].get('cached'), '.0f')})"
                              for name, label2 in CALLER_CASES if (c.get(name) or {}).get(part, {}).get("n"))
            w(f"    {label:<14} {cells}")
        others = {n: ttft(v["others"]) for n, v in c.items()}
        w(f"    callers 2-{p['callers']}: shared / off {f(div(others.get('shared'), others.get('off')), '.2f')}x, "
          f"per-caller (isolated) / off {f(div(others.get('on'), others.get('off')), '.2f')}x")
    pol = ours.get("policy") or {}
    w("  servers (GetModelInfo): " + "; ".join(
        f"{n} {v['budget_bytes'] >> 20} MiB in {v['block_positions']}-position blocks, scope {v['scope']}"
        for n, v in pol.items()))
    w("")


def report(all_res: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    lines: list[str] = []
    targets: list[dict[str, Any]] = []
    w = lines.append

    def target(model: str, name: str, value: Any, goal: str, ok: bool | None) -> str:
        targets.append({"model": model, "target": name, "value": value, "goal": goal, "result": verdict(ok)})
        return verdict(ok)

    def check(model: str, name: str, value: float | None, goal: str, ok: Any) -> str:
        return target(model, name, value, goal, None if value is None else bool(ok(value)))

    for key, res in all_res["models"].items():
        n = res["plan"]["new_tokens"]
        eng = engines(res)
        ours, grpc_ = eng.get("tokenstream, in-process") or {}, eng.get("tokenstream over gRPC") or {}
        hf = eng.get("transformers generate()") or {}
        lc = res.get("llamacpp") or {}
        lcf, lcq = lc.get("f32") or {}, lc.get("q4_1") or {}
        inproc = res.get("inproc") or {}
        w(f"== {describe(key)} ==")
        cs = [str(c) for c in res["plan"]["sweep"]]
        if eng:
            throughput_tables(res, eng, w)

        # Targets against the peers.
        b1 = tps(ours.get("1"))
        lb = (lcf.get("bench") or {}).get("tokens_per_s")
        if lb:
            vs_lb = div(b1, lb)
            w(f"batch 1: ours in-process {f(b1)} / llama-bench F32 {f(lb)} tok/s = {f(vs_lb, '.2f')}x  [target >= 1.0: "
              f"{check(key, 'batch 1 vs llama.cpp F32', vs_lb, '>= 1.0', lambda x: x >= 1.0)}]")
        steps = inproc.get("steps")
        if steps and b1:
            row1 = next((r for r in steps["rows"] if r["batch"] == 1), None)
            if row1:
                frac = b1 / row1["bound_tokens_per_s"]
                w(f"batch 1: ours in-process {f(b1)} tok/s = {100 * frac:.0f}% of the memory bound "
                  f"{row1['bound_tokens_per_s']:.0f} tok/s ({(row1['bytes_weights'] + row1['bytes_kv_at_length']) / 1e6:.0f}"  # noqa: E501
                  f" MB/step at {steps['bandwidth']['bound_GBps']:.1f} GB/s)  "
                  f"[target >= 70%: {check(key, 'batch 1 vs memory bound', frac, '>= 0.70', lambda x: x >= 0.70)}]")
        for c in ("8", "32"):
            theirs = tps((lcf.get("server") or {}).get(c))
            if theirs:
                vs_ls = div(tps(grpc_.get(c)), theirs)
                w(f"{c} streams: ours over gRPC {f(tps(grpc_.get(c)))} / llama-server F32 -np {c} {f(theirs)} tok/s = "
                  f"{f(vs_ls, '.2f')}x  [target >= 1.0: "
                  f"{check(key, f'{c} streams vs llama-server F32', vs_ls, '>= 1.0', lambda x: x >= 1.0)}]")
        if hf:
            ratios = {c: r for c in cs if (r := div(tps(ours.get(c)), tps(hf.get(c)))) is not None}
            worst = min(ratios.values()) if ratios else None
            w("ours in-process / transformers generate(): " + ", ".join(f"{c}: {r:.2f}x" for c, r in ratios.items())
              + f"  [target >= 1.0 at every batch size: "
              f"{check(key, 'vs transformers at every batch size', worst, '>= 1.0', lambda x: x >= 1.0)}]")
        for c in ("1", "8"):
            sw = (inproc.get("sweep") or {}).get(c)
            if sw:
                rr = sw["round_ratios"]
                r = sw["grpc_over_inproc"]
                w(f"gRPC / in-process at {c} stream{'s' if c != '1' else ''}: median of {len(rr)} alternated rounds "
                  f"{r:.3f}x (rounds {min(rr):.2f}-{max(rr):.2f})  [target >= 0.97: "
                  f"{check(key, f'gRPC/in-process at {c}', r, '>= 0.97', lambda x: x >= 0.97)}]")
        a = res.get("arrivals")
        if a:
            lt = a.get("loaded_ttft_ms") or a["ttft_ms"]
            tr = lt["p99"] / lt["p50"] if lt.get("p50") else None
            it = a["itl_ms"]
            ir = it["p99"] / it["p50"] if it.get("p50") else None
            w(f"arrivals, 8 streams ({a['requests']} requests of ~{a['new_tokens']} tokens +-"
              f"{100 * a['jitter']:.0f}%, long prompts, clients started {a['stagger_s'] * 1e3:.0f} ms apart, closed "
              f"loop): {f(a['tokens_per_s'])} tok/s{busy_mark(a)}")
            w(f"  TTFT under load (n={lt['n']}) p50 {f(lt['p50'])} p99 {f(lt['p99'])} ms = {f(tr, '.2f')}x  "
              f"[target <= 3x: {check(key, 'arrivals TTFT p99/p50', tr, '<= 3', lambda x: x <= 3)}]")
            w(f"  ITL p50 {f(it['p50'])} p99 {f(it['p99'])} ms = {f(ir, '.2f')}x  "
              f"[target <= 3x: {check(key, 'arrivals ITL p99/p50', ir, '<= 3', lambda x: x <= 3)}]")
            st = a.get("loaded_server_ttft_ms")
            if st and st.get("p50"):
                w(f"  (server-side TTFT under load p50 {f(st['p50'])} p99 {f(st['p99'])} ms)")
            for v, label in ((lcf, "llama-server F32"), (lcq, "llama-server Q4_1")):
                la = v.get("arrivals")
                if la:
                    lt2 = la.get("loaded_ttft_ms") or la["ttft_ms"]
                    w(f"  {label}, same plan: {f(la['tokens_per_s'])} tok/s{busy_mark(la)}; TTFT under load p50 "
                      f"{f(lt2['p50'])} p99 {f(lt2['p99'])} ms; ITL p50 {f(la['itl_ms']['p50'])} p99 "
                      f"{f(la['itl_ms']['p99'])} ms")
        w("")

        # Same greedy tokens?
        ag = res.get("agreement") or {}
        parts = [f"{label}{' at other batch sizes' if v.get('note') else ''} {v['identical']}/{v['streams']}"
                 + ("" if v["first_divergence"] is None else f" (first differs at token {v['first_divergence']})")
                 for label, v in ag.items() if isinstance(v, dict)]
        if parts:
            w(f"greedy token agreement with ours in-process (identical {n}-token streams / streams): "
              + "; ".join(parts))
        wc = lc.get("weights_check")
        if wc:
            w(f"weights: F32 GGUF (llama-quantize from Q4_1) vs our fp32 safetensors: {wc['identical']}/"
              f"{wc['tensors']} tensors bit-identical, max |diff| {wc['max_abs_diff']:.3g}")
        tk = (lcf or lcq).get("tokenize") if (lcf or lcq) else None
        if tk:
            w(f"tokenizer: llama.cpp's /tokenize gives our ids for {tk['same_ids']}/{tk['prompts']} prompt texts")

        # Naive loop and paddleformers (random models).
        seq = (res.get("sequence") or {}).get("lengths") or {}
        pf = res.get("paddleformers") or {}
        naive = pf.get("naive") or {}
        if naive:
            w("Naive loop (paddleformers generate(max_new_tokens=1) per token, full re-tokenize; no KV reuse), "
              "batch 1:")
            for length, nv in naive.items():
                o = median((seq.get(length) or {}).get("tokens_per_s") or [])
                ratio = o / nv["tokens_per_s"] if o else None
                note = check(key, f"ours/naive at {length}", ratio, ">= 20 at 256", lambda x: x >= 20) \
                    if length == "256" else "(target applies at 256)"
                w(f"  {length:>4} tokens: ours {f(o)} tok/s, naive {f(nv['tokens_per_s'], '.2f')} tok/s -> "
                  f"{f(ratio)}x  {note}")
        peer = pf.get("streamer")
        ours8 = tps(grpc_.get("8"))
        if peer:
            ratio = ours8 / peer["tokens_per_s"] if ours8 else None
            w(f"paddleformers generate + TextIteratorStreamer, {peer['requests']} requests one after another, "
              f"{peer['new_tokens']} tokens: {f(peer['tokens_per_s'])} tok/s (TTFT p50 "
              f"{f(peer['ttft_ms']['p50'], '.0f')} ms); ours at 8 concurrent {f(ours8)} tok/s -> {f(ratio, '.2f')}x  "
              f"[target >= 1.5: {check(key, 'ours@8 / paddleformers', ratio, '>= 1.5', lambda x: x >= 1.5)}]")

        if steps:
            bw = steps["bandwidth"]
            w(f"Memory-bandwidth bound: {bw['bound_GBps']:.1f} GB/s = best of a 256 MB copy (numpy "
              f"{bw['numpy_copy_GBps_best']:.1f}, paddle {bw['paddle_copy_GBps_best']:.1f} GB/s, 2x bytes/s), a sum "
              f"({bw['numpy_read_GBps_best']:.1f}) and a GEMV ({f(bw.get('gemv_read_GBps_best'))} GB/s) reading it; "
              f"bytes/step = weights incl. lm_head "
              f"{steps['weight_bytes']['lm_head'] / 1e6:.0f} MB + KV at length {steps['rows'][0]['length']}. "
              f"1024^3 GEMM: paddle {bw['paddle_gemm1024_GFLOPS']:.0f}, numpy {bw['numpy_gemm1024_GFLOPS']:.0f} "
              "GFLOP/s")
            w(f"  {'batch':>5} {'MB/step':>8} {'bound tok/s':>11} {'step ms':>8} {'step tok/s':>10} {'% bound':>7} "
              f"{'GFLOP/s':>7} {'in-proc tok/s':>13} {'% bound':>7}")
            for row in steps["rows"]:
                served = tps(ours.get(str(row["batch"])))
                w(f"  {row['batch']:>5} {(row['bytes_weights'] + row['bytes_kv_at_length']) / 1e6:>8.1f} "
                  f"{row['bound_tokens_per_s']:>11.0f} {row['step_ms_p50']:>8.1f} {row['tokens_per_s']:>10.1f} "
                  f"{100 * row['fraction_of_bound']:>6.1f}% {row['gflops']:>7.1f} {f(served):>13} "
                  f"{f(100 * served / row['bound_tokens_per_s'] if served else None):>6}%")
            for it in steps.get("engine_iterations", []):
                w(f"  Engine iteration at batch {it['batch']}: {it['ms_per_iteration']:.1f} ms "
                  f"({it['tokens_per_s']:.0f} tok/s), of which decode_step {it['decode_step_ms']:.1f} ms; "
                  f"outside the model (sampling, detokenize, publish): {100 * it['outside_model_fraction']:.0f}%")
        prof = inproc.get("profile")
        if prof:
            for b in ("8", "32"):
                pb = prof.get(b)
                matmuls = (prof.get("parts") or {}).get(b) or {}
                if not pb:
                    continue
                top = ", ".join(f"{r['func']} {100 * r['share']:.0f}%" for r in pb["top"][:3])
                w(f"  profile batch {b}: {pb['total_ms_per_step']:.1f} ms/step (cProfile); top: {top}")
                w(f"    the step's GEMMs timed alone: lm_head {f(matmuls.get('lm_head_ms'))} ms (numpy BLAS "
                  f"{f(matmuls.get('numpy_lm_head_ms'))}), mlp {f(matmuls.get('mlp_ms_all_layers'))} ms (numpy "
                  f"{f(matmuls.get('numpy_mlp_ms_all_layers'))}), qkv+o {f(matmuls.get('qkv_o_ms_all_layers'))} ms, "
                  f"attention {f(matmuls.get('attention_ms_all_layers'))} ms")
        rss = res.get("rss")
        if rss:
            g = rss["growth"]
            w(f"RSS of the server: {rss['before'] / 2**20:.0f} MiB after warm-up -> {rss['after'] / 2**20:.0f} MiB "
              f"after {rss['requests']} short requests ({res['plan']['rss_new_tokens']} tokens, 8 concurrent, "
              f"{rss['requests_per_s']:.0f} req/s): {100 * g:+.2f}%  "
              f"[target < 5%: {check(key, 'RSS growth over 1000 requests', g, '< 0.05', lambda x: x < 0.05)}]")
        con = res.get("constrained")
        if con and con.get("rows"):
            every = con["rows"][-1]
            steps_ms = ", ".join(f"{r['constrained_rows']} rows {r['step_ms_p50']:.1f} ms" for r in con["rows"])
            w(f"Structured output, batch {con['batch']}: {steps_ms}; all rows constrained "
              f"{every['ratio_vs_unconstrained_p50']:.2f}x the unconstrained step  [target <= 1.1x: "
              f"{check(key, 'constrained step', every['ratio_vs_unconstrained_p50'], '<= 1.1', lambda x: x <= 1.1)}]; "
              f"a typical schema compiles in {con['compile_ms_p50']:.1f} ms  [target < 50 ms: "
              f"{check(key, 'schema compile ms', con['compile_ms_p50'], '< 50', lambda x: x < 50)}]")
        gil = inproc.get("gil")
        if gil:
            def row(k: str, gil: dict[str, Any] = gil) -> str:
                g = gil.get(k) or {}
                s = g.get("probe_lateness_ms") or {}
                return (f"p50 {f(s.get('p50'), '.2f')} p99 {f(s.get('p99'), '.2f')} max {f(s.get('max'), '.1f')} ms"
                        f" ({f(g.get('decode_tokens_per_s'), '.0f')} tok/s)")
            w(f"GIL: 1 ms asyncio probe beside Engine.generate at batch {gil['batch']} (same loop), "
              f"{gil['seconds']:.0f} s windows:")
            w(f"  engine idle            {row('idle_engine_1ms')}")
            w(f"  switchinterval 5 ms    {row('switch_5ms')};  again {row('switch_5ms_again')}")
            w(f"  switchinterval 1 ms    {row('switch_1ms')};  again {row('switch_1ms_again')}")
            p99s = [((gil.get(k) or {}).get("probe_lateness_ms") or {}).get("p99") or 0
                    for k in ("switch_5ms", "switch_5ms_again")]
            starved = min(p99s) > 5.0
            w(f"  verdict at the server's 5 ms setting: {'loop STARVED' if starved else 'no starvation'} "
              f"(p99 lateness {'>' if starved else '<='} 5 ms)")
        prefix_report(key, res, w, check)
        timed = [r for runs in eng.values() for r in runs.values() if r.get("idle")]
        timed += [x for x in (lcf.get("bench"), lcq.get("bench"), a) if x and x.get("idle")]
        if timed:
            busy = sorted(r["idle"]["busy"] for r in timed)
            others = sorted(r["during"]["others"] for r in timed if r.get("during"))
            w(f"quiet timings: {sum(1 for r in timed if quiet_run(r))}/{len(timed)} (idle before: < "
              f"{100 * all_res.get('idle', IDLE_DEFAULTS)['threshold']:.0f}% of all CPUs busy over 1 s, and other "
              f"processes below that during); busy before: median {100 * busy[len(busy) // 2]:.0f}%, max "
              f"{100 * busy[-1]:.0f}%" + (f"; others during: median {100 * others[len(others) // 2]:.0f}%, max "
                                           f"{100 * others[-1]:.0f}%" if others else ""))
        w("")
    w("Targets: " + ", ".join(f"{t['model']}:{t['target']}={t['result']}" for t in targets))
    return "\n".join(lines), targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer concurrencies and tokens (< 5 minutes with peers)")
    p.add_argument("--smoke", action="store_true", help="every phase once at its smallest (the smoke run of `make "
                   "test`, best on --models tiny): checks that the bench runs, its figures mean nothing")
    p.add_argument("--models", default="", help=f"comma-separated subset of {','.join(MODELS)} "
                   f"(default: {DEFAULT_MODEL}; tiny and base are random-weight models for scale tests)")
    p.add_argument("--peers", default="", help=f"optional peers, comma-separated: {','.join(PEERS)}")
    p.add_argument("--only", default="", help=f"run only these stages, comma-separated: {','.join(STAGES)} (server: "
                   "our main server's phases; prefix: prefix reuse, with llama-server's under --peers llamacpp; "
                   "peers: the peers' throughput)")
    p.add_argument("--budget-min", type=float, default=0, help="soft time budget, building excluded (default 10 "
                   f"quick, 40 full): a phase's timeout is the time left, at least {MIN_PHASE_S:.0f} s")
    p.add_argument("--idle", default="", help="idle check: THRESHOLD,MAX_WAIT_S (default "
                   f"{IDLE_DEFAULTS['threshold']},{IDLE_DEFAULTS['max_wait_s']:.0f}): before each timing wait up to "
                   "MAX_WAIT_S for less than THRESHOLD of all CPUs to be busy over 1 s")
    p.add_argument("--charts", default=str(REPO / "bench" / "charts"), help="where the PNG charts go ('' for none)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", default="", help="only print the table of an earlier results JSON (and redraw charts)")
    args = p.parse_args(argv)
    if args.report:
        earlier = json.loads(Path(args.report).read_text())
        was = earlier.get("idle") or IDLE_DEFAULTS
        os.environ["TOKENSTREAM_BENCH_IDLE"] = f"{was['threshold']},{was['max_wait_s']}"
        print(report(earlier)[0])
        if args.charts:
            print(charts(earlier, Path(args.charts)))
        return 0
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    models = [m for m in (args.models or DEFAULT_MODEL).split(",") if m]
    peers = {x for x in args.peers.split(",") if x}
    stages = {x for x in args.only.split(",") if x} or set(STAGES)
    unknown = [m for m in models if m not in MODELS] + [x for x in peers if x not in PEERS] + \
        [x for x in stages if x not in STAGES]
    if unknown:
        p.error(f"unknown model, peer or stage: {unknown}; models: {', '.join(MODELS)}; peers: {', '.join(PEERS)}; "
                f"stages: {', '.join(STAGES)}")
    idle = dict(IDLE_DEFAULTS)
    if args.idle:
        try:
            idle["threshold"], idle["max_wait_s"] = (float(x) for x in args.idle.split(","))
        except ValueError:
            p.error(f"--idle {args.idle!r}: expected THRESHOLD,MAX_WAIT_S, for example 0.15,8")
    os.environ["TOKENSTREAM_BENCH_IDLE"] = f"{idle['threshold']},{idle['max_wait_s']}"  # for every phase process
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = Path(args.out) / f"{stamp}-{mode}"
    raw.mkdir(parents=True, exist_ok=True)
    budget = args.budget_min or (10 if args.quick else 40)
    t0 = time.monotonic()
    all_res: dict[str, Any] = {
        "mode": mode, "models": {}, "peers": sorted(peers), "stages": sorted(stages), "started": stamp, "idle": idle,
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": sys.version.split()[0],
                 "cpu": cpu_name()},
    }
    for key in models:
        log(f"[{key}] start ({mode})")
        all_res["models"][key] = bench_model(key, args.quick, peers, raw, t0 + budget * 60, args.smoke, stages)
        write_json(raw.with_suffix(".json"), all_res)
    all_res["host"]["loadavg_end"] = os.getloadavg()
    all_res["seconds"] = time.monotonic() - t0
    all_res["prepare_seconds"] = sum(r["prepare"]["seconds"] for r in all_res["models"].values())
    table, targets = report(all_res)
    all_res["targets"] = targets
    all_res["table"] = table
    write_json(raw.with_suffix(".json"), all_res)
    print(table)
    if args.charts:
        print(charts(all_res, Path(args.charts)))
    print(f"\n{mode} run: {all_res['seconds']:.0f} s ({all_res['prepare_seconds']:.0f} s of it building/converting) on "
          f"{os.cpu_count()} CPUs, load average {all_res['host']['loadavg_start'][0]:.1f} at start, "
          f"{all_res['host']['loadavg_end'][0]:.1f} at end; results: {raw.with_suffix('.json')}")
    return 0


def charts(all_res: dict[str, Any], outdir: Path) -> str:
    try:
        from bench.charts import write_charts
    except ImportError as e:
        return f"charts: skipped ({e}); install the dev extra for matplotlib"
    paths = write_charts(all_res, outdir)
    return "charts: " + ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in paths)


if __name__ == "__main__":
    raise SystemExit(main())
