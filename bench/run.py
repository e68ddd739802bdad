"""Benchmark entry point: `python -m bench.run [--quick] [--peers hf] [--models tiny,base]` (or `make bench`).

Runs every measurement of issue #3 in separate processes (server, load generator, in-process engine, peers),
prints one table of medians and side-by-side ratios, and writes bench/results/<stamp>-<mode>.json
(raw per-phase JSON next to it in bench/results/<stamp>-<mode>/). Targets are reported PASS/MISS, never asserted.
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

from bench.common import MODELS, REPO, RESULTS, bench_env, free_port, log, median, param_counts, rss_bytes, write_json

PY = sys.executable


# -- plans -----------------------------------------------------------------------------------------

def plan_for(model: str, quick: bool) -> dict[str, Any]:
    if model == "tiny":
        return {
            "sweep": [1, 4, 8, 16, 32], "new_tokens": 32 if quick else 64,
            "arrivals_requests": 3,
            "naive": [64] if quick else [64, 128, 256], "seq_rounds": 2 if quick else 1,
            "transport_rounds": 5, "transport_tokens": 32, "streamer_requests": 8,
            "rss_requests": 1000, "rss_warmup": 96, "rss_new_tokens": 2,
            "step_length": 128, "reps": 4 if quick else 6, "iter_steps": 12, "gil_seconds": 1.5 if quick else 2.0,
            "inproc_parts": "transport,steps,profile,gil",
        }
    return {  # base: ~10x the work per token of tiny, so fewer tokens and repetitions
        "sweep": [1, 4, 8, 16, 32], "new_tokens": 32, "arrivals_requests": 2,
        "naive": [32], "seq_rounds": 2, "transport_rounds": 5, "transport_tokens": 16, "streamer_requests": 8,
        "rss_requests": 0, "rss_warmup": 0, "rss_new_tokens": 2,
        "step_length": 64, "reps": 3, "iter_steps": 5, "gil_seconds": 2.0,
        "inproc_parts": "transport,steps,profile,gil",
    }


# -- processes -------------------------------------------------------------------------------------

class Server:
    def __init__(self, model_dir: Path, logdir: Path, name: str) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.log = open(logdir / f"server-{name}.log", "w")  # noqa: SIM115
        cmd = [PY, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--model-dir", str(model_dir),
               "--max-slots", "32", "--max-context", "2048", "--max-queue", "64", "--max-new-tokens-limit", "2048",
               "--grace-s", "1"]
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def run_py(module: str, args: list[str], out: Path, logdir: Path, timeout: float) -> dict[str, Any] | None:
    """Run `python -m module args --out out`; return its JSON, or None (and log why) on failure or timeout."""
    name = out.stem
    t = time.monotonic()
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
    args = ["--target", server.target]
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

def bench_model(key: str, quick: bool, peers: set[str], raw: Path, budget_end: float) -> dict[str, Any]:
    from bench.common import model_dir

    plan = plan_for(key, quick)
    res: dict[str, Any] = {"model": key, "params": param_counts(key), "plan": plan}
    t = time.monotonic()
    mdir = model_dir(key)
    res["model_dir"] = str(mdir)
    res["build_s"] = time.monotonic() - t
    n = plan["new_tokens"]
    left = lambda: max(30.0, budget_end - time.monotonic())  # noqa: E731

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

        res["sweep"] = {}
        for c in plan["sweep"]:
            r = load_phase(server, raw / f"{key}-sweep-c{c}.json", raw, left(), kind="closed", concurrency=c,
                           requests=1, new_tokens=n, warmup=True)
            res["sweep"][str(c)] = r

        # Continuous arrivals at 8 streams: staggered starts (one request time / 8 apart), lengths +-25 %.
        c8 = res["sweep"].get("8") or {}
        stagger = (c8.get("wall_s") or 8.0) / 8
        res["arrivals"] = load_phase(server, raw / f"{key}-arrivals-c8.json", raw, left(), kind="arrivals",
                                     concurrency=8, requests=plan["arrivals_requests"], new_tokens=n,
                                     stagger_s=round(stagger, 3), jitter=0.25, warmup=True)

        lengths = sorted(set(plan["naive"]) | {n})
        res["sequence"] = load_phase(server, raw / f"{key}-sequence.json", raw, left(), kind="sequence",
                                     lengths=lengths, requests=plan["seq_rounds"], warmup=True)

        res["inproc"] = run_py("bench.inproc", [
            "--model-dir", str(mdir), "--target", server.target, "--parts", plan["inproc_parts"],
            "--new-tokens", str(plan["transport_tokens"]), "--rounds", str(plan["transport_rounds"]),
            "--length", str(plan["step_length"]), "--iter-steps", str(plan["iter_steps"]),
            "--reps", str(plan["reps"]), "--gil-seconds", str(plan["gil_seconds"]),
            "--batches", *map(str, plan["sweep"]),
        ], raw / f"{key}-inproc.json", raw, left())
        res["rss_end"] = rss_bytes(server.pid)
    finally:
        server.stop()

    res["paddleformers"] = run_py("bench.peers_paddle", [
        "--model-dir", str(mdir), "--naive", *map(str, plan["naive"]),
        "--streamer", str(plan["streamer_requests"]), "--new-tokens", str(n),
    ], raw / f"{key}-paddleformers.json", raw, left())
    if "hf" in peers:
        res["hf"] = run_py("bench.peers_hf", [
            "--model-dir", str(mdir), "--streamer", str(plan["streamer_requests"]), "--new-tokens", str(n),
        ], raw / f"{key}-hf.json", raw, left())
    return res


# -- report ----------------------------------------------------------------------------------------

def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "MISS")


def f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def report(all_res: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    lines: list[str] = []
    targets: list[dict[str, Any]] = []
    w = lines.append

    def target(model: str, name: str, value: Any, goal: str, ok: bool | None) -> str:
        targets.append({"model": model, "target": name, "value": value, "goal": goal, "result": verdict(ok)})
        return verdict(ok)

    for key, res in all_res["models"].items():
        p = res["params"]
        m = MODELS[key]
        w(f"== {key}: Llama {m.num_layers} layers, hidden {m.hidden_size}, heads {m.num_heads}/{m.num_kv_heads}, "
          f"{p['total'] / 1e6:.1f}M params ({p['layers'] / 1e6:.1f}M in layers + {p['embedding_tied'] / 1e6:.1f}M "
          f"tied Qwen2 embedding), fp32, random weights ==")
        n = res["plan"]["new_tokens"]
        w(f"gRPC, server + separate load-generator process, greedy, {n} new tokens per request, all streams start "
          "together:")
        w(f"  {'streams':>7} {'agg tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}  (ms)")
        for c, r in (res.get("sweep") or {}).items():
            if not r:
                w(f"  {c:>7} failed")
                continue
            w(f"  {c:>7} {f(r['tokens_per_s']):>10} {f(r['ttft_ms']['p50']):>9} {f(r['ttft_ms']['p99']):>9} "
              f"{f(r['itl_ms']['p50']):>8} {f(r['itl_ms']['p99']):>8}")
        a = res.get("arrivals")
        if a:
            lt = a.get("loaded_ttft_ms") or a["ttft_ms"]
            ratio = lt["p99"] / lt["p50"] if lt.get("p50") else None
            w(f"  arrivals, 8 streams (closed loop, starts {a['stagger_s'] * 1e3:.0f} ms apart, lengths +-25 %): "
              f"{a['requests']} req, {f(a['tokens_per_s'])} tok/s; TTFT under load (n={lt['n']}) p50 "
              f"{f(lt['p50'])} p99 {f(lt['p99'])} ms = {f(ratio, '.2f')}x  [target <= 3x: "
              f"{target(key, 'TTFT p99/p50 under arrivals', ratio, '<= 3', None if ratio is None else ratio <= 3)}]")
            st = a.get("loaded_server_ttft_ms")
            if st and st.get("p50"):
                w(f"    (server-side TTFT p50 {f(st['p50'])} p99 {f(st['p99'])} ms; ITL p50 {f(a['itl_ms']['p50'])} "
                  f"p99 {f(a['itl_ms']['p99'])} ms)")
        inproc = res.get("inproc") or {}
        tr = inproc.get("transport")
        if tr:
            r = tr["grpc_over_inproc"]
            rr = tr.get("round_ratios") or [r]
            w(f"Transport, batch 1, {tr['new_tokens']} tokens, alternated x{tr['rounds']}: in-process "
              f"{f(tr['inproc_p50'])} tok/s, gRPC {f(tr['grpc_p50'])} tok/s; median of per-round ratios {r:.3f}x "
              f"(rounds {min(rr):.2f}-{max(rr):.2f})  "
              f"[target >= 0.97: {target(key, 'gRPC/in-process at batch 1', r, '>= 0.97', r >= 0.97)}]")
        seq = (res.get("sequence") or {}).get("lengths") or {}
        pf = res.get("paddleformers") or {}
        naive = pf.get("naive") or {}
        if naive:
            w("Naive loop (paddleformers generate(max_new_tokens=1) per token, full re-tokenize; no KV reuse), "
              "batch 1:")
            for length, nv in naive.items():
                ours = median((seq.get(length) or {}).get("tokens_per_s") or [])
                ratio = ours / nv["tokens_per_s"] if ours else None
                goal = ratio >= 20 if (ratio is not None and length == "256") else None
                note = target(key, f"ours/naive at {length}", ratio, ">= 20 at 256", goal) if length == "256" \
                    else "(target applies at 256)"
                w(f"  {length:>4} tokens: ours {f(ours)} tok/s, naive {f(nv['tokens_per_s'], '.2f')} tok/s -> "
                  f"{f(ratio)}x  {note}")
        ours8 = ((res.get("sweep") or {}).get("8") or {}).get("tokens_per_s")
        for label, peer in (("paddleformers generate + TextIteratorStreamer", pf.get("streamer")),
                            ("HF transformers/PyTorch + TextIteratorStreamer", (res.get("hf") or {}).get("streamer"))):
            if not peer:
                continue
            ratio = ours8 / peer["tokens_per_s"] if ours8 else None
            ok = None if ratio is None else ratio >= 1.5
            w(f"{label}, {peer['requests']} requests one after another, {peer['new_tokens']} tokens: "
              f"{f(peer['tokens_per_s'])} tok/s (TTFT p50 {f(peer['ttft_ms']['p50'], '.0f')} ms); ours at 8 "
              f"concurrent {f(ours8)} tok/s -> {f(ratio, '.2f')}x  "
              f"[target >= 1.5: {target(key, 'ours@8 / ' + label.split()[0], ratio, '>= 1.5', ok)}]")
        steps = inproc.get("steps")
        if steps:
            bw = steps["bandwidth"]
            w(f"Memory-bandwidth bound: copy bandwidth {bw['bound_GBps']:.1f} GB/s (best of numpy/paddle 256 MB copy, "
              f"2x bytes/s), read-only sum {bw['numpy_read_GBps_best']:.1f} GB/s; bytes/step = weights incl. lm_head "
              f"{steps['weight_bytes']['lm_head'] / 1e6:.0f} MB + KV at length {steps['rows'][0]['length']}. "
              f"1024^3 GEMM: paddle {bw['paddle_gemm1024_GFLOPS']:.0f}, numpy {bw['numpy_gemm1024_GFLOPS']:.0f} "
              "GFLOP/s")
            w(f"  {'batch':>5} {'MB/step':>8} {'bound tok/s':>11} {'step ms':>8} {'engine tok/s':>12} {'% bound':>7} "
              f"{'GFLOP/s':>7} {'served tok/s':>12} {'% bound':>7}")
            for row in steps["rows"]:
                served = ((res.get("sweep") or {}).get(str(row["batch"])) or {}).get("tokens_per_s")
                w(f"  {row['batch']:>5} {(row['bytes_weights'] + row['bytes_kv_at_length']) / 1e6:>8.1f} "
                  f"{row['bound_tokens_per_s']:>11.0f} {row['step_ms_p50']:>8.1f} {row['tokens_per_s']:>12.1f} "
                  f"{100 * row['fraction_of_bound']:>6.1f}% {row['gflops']:>7.1f} {f(served):>12} "
                  f"{f(100 * served / row['bound_tokens_per_s'] if served else None):>6}%")
            for it in steps.get("engine_iterations", []):
                w(f"  Engine iteration at batch {it['batch']}: {it['ms_per_iteration']:.1f} ms "
                  f"({it['tokens_per_s']:.0f} tok/s), of which decode_step {it['decode_step_ms']:.1f} ms; "
                  f"outside the model (sampling, detokenize, publish): {100 * it['outside_model_fraction']:.0f}%")
        prof = inproc.get("profile")
        if prof:
            for b in ("8", "32"):
                pb = prof.get(b)
                parts = (prof.get("parts") or {}).get(b) or {}
                if not pb:
                    continue
                top = ", ".join(f"{r['func']} {100 * r['share']:.0f}%" for r in pb["top"][:3])
                w(f"  profile batch {b}: {pb['total_ms_per_step']:.1f} ms/step (cProfile); top: {top}")
                w(f"    the step's GEMMs timed alone: lm_head {f(parts.get('lm_head_ms'))} ms (numpy BLAS "
                  f"{f(parts.get('numpy_lm_head_ms'))}), mlp {f(parts.get('mlp_ms_all_layers'))} ms (numpy "
                  f"{f(parts.get('numpy_mlp_ms_all_layers'))}), qkv+o {f(parts.get('qkv_o_ms_all_layers'))} ms, "
                  f"attention {f(parts.get('attention_ms_all_layers'))} ms")
        rss = res.get("rss")
        if rss:
            g = rss["growth"]
            w(f"RSS of the server: {rss['before'] / 2**20:.0f} MiB after warm-up -> {rss['after'] / 2**20:.0f} MiB "
              f"after {rss['requests']} short requests ({res['plan']['rss_new_tokens']} tokens, 8 concurrent, "
              f"{rss['requests_per_s']:.0f} req/s): {100 * g:+.2f}%  "
              f"[target < 5%: {target(key, 'RSS growth over 1000 requests', g, '< 0.05', g < 0.05)}]")
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
        w("")
    w("Targets: " + ", ".join(f"{t['model']}:{t['target']}={t['result']}" for t in targets))
    return "\n".join(lines), targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny model only, fewer tokens (~3 minutes)")
    p.add_argument("--models", default="", help="comma-separated subset of tiny,base (default: tiny,base; quick: tiny)")
    p.add_argument("--peers", default="", help="optional peers, comma-separated: hf")
    p.add_argument("--budget-min", type=float, default=0, help="soft time budget; phases past it get 30 s")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--report", default="", help="only print the table of an earlier results JSON")
    args = p.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text()))[0])
        return 0
    os.environ.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    models = [m for m in (args.models or ("tiny" if args.quick else "tiny,base")).split(",") if m]
    peers = {x for x in args.peers.split(",") if x}
    unknown = [m for m in models if m not in MODELS] + [x for x in peers if x != "hf"]
    if unknown:
        p.error(f"unknown model or peer: {unknown}")
    mode = "quick" if args.quick else "full"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = Path(args.out) / f"{stamp}-{mode}"
    raw.mkdir(parents=True, exist_ok=True)
    budget = args.budget_min or (8 if args.quick else 25)
    t0 = time.monotonic()
    all_res: dict[str, Any] = {
        "mode": mode, "models": {}, "peers": sorted(peers), "started": stamp,
        "host": {"cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "python": sys.version.split()[0]},
    }
    for key in models:
        log(f"[{key}] start ({mode})")
        all_res["models"][key] = bench_model(key, args.quick, peers, raw, t0 + budget * 60)
        write_json(raw.with_suffix(".json"), all_res)
    all_res["host"]["loadavg_end"] = os.getloadavg()
    all_res["seconds"] = time.monotonic() - t0
    table, targets = report(all_res)
    all_res["targets"] = targets
    all_res["table"] = table
    write_json(raw.with_suffix(".json"), all_res)
    print(table)
    print(f"\n{mode} run: {all_res['seconds']:.0f} s on {os.cpu_count()} CPUs (load average at start "
          f"{all_res['host']['loadavg_start'][0]:.1f}); results: {raw.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
