"""Peer: llama.cpp, built from the llama-cpp-python sdist's vendored source (scripts/build_llamacpp.sh, cached).

    python -m bench.peers_llamacpp --model-dir HF_DIR --out FILE.json --variants f32,q4_1 --concurrency 1 4 8 16 32

For each variant (the F32 GGUF that `llama-quantize --allow-requantize` makes from the shipped Q4_1, with weights
identical to the ones our engine loads, and the shipped Q4_1 itself):
  bench      `llama-bench -m GGUF -p 0 -n N -t THREADS -o json`: batch-1 decode, tokens/s (its tg test).
  server     `llama-server -m GGUF -np C -t THREADS -c C*ctx` on a free 127.0.0.1 port for each concurrency C,
             C concurrent streaming /completion requests started together: aggregate tokens/s, TTFT, ITL.
  arrivals   (F32 and Q4_1, at 8 slots) the arrivals plan of bench.load: 8 closed-loop clients started
             stagger_s apart, long prompts, lengths jittered, timed the same way.
Requests send the prompt as token ids (our tokenizer's, so every engine starts from the same ids), greedy
(temperature 0, top_k 1), ignore_eos so each generates exactly N tokens, cache_prompt off, and return_tokens so
the generated ids can be compared with ours. The server's prompt cache (--cache-ram) is off (bench/multiturn.py
starts its own llama-server with it on, and cache_prompt, for prefix reuse). Each server gets one
warm-up request; each timing an idle check before it. Also recorded: whether llama.cpp's own tokenizer gives
our ids for every prompt text (/tokenize), and whether the F32 GGUF's tensors equal our safetensors bit for bit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    CpuMeter,
    aggregate,
    arrival_plan,
    encode_prompts,
    free_port,
    log,
    prompt_set,
    smollm2_gguf,
    stop_process,
    wait_idle,
    write_json,
)
from tests.support.load import StreamTimer

SLOT_CONTEXT = 512  # per-slot context: the longest prompt (66) + 128 tokens + jitter fits


def build() -> Path:
    """llama.cpp's bin directory; builds once (minutes) and then reuses the cached build."""
    done = subprocess.run(["bash", str(REPO / "scripts" / "build_llamacpp.sh")], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/build_llamacpp.sh failed ({done.returncode}): {done.stderr[-2000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


def f32_gguf(bin_dir: Path, q4: Path) -> Path:
    """The F32 GGUF made from the Q4_1 file (cached beside it): llama.cpp's own dequantization."""
    out = q4.with_name(q4.name.replace("Q4_1", "F32"))
    assert out != q4, f"{q4.name} does not say Q4_1"
    if out.exists():
        return out
    tmp = out.with_suffix(".part")
    done = subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(q4), str(tmp), "F32"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llama-quantize failed ({done.returncode}): {done.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def weights_check(gguf: Path, hf_dir: Path) -> dict[str, Any]:
    """Compare every tensor of the F32 GGUF with the safetensors our engine loads (q/k rows in llama.cpp's
    rotary order, as its converter permutes them)."""
    import numpy as np
    from gguf import GGUFReader
    from safetensors import safe_open

    cfg = json.loads((hf_dir / "config.json").read_text())
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w: Any, n: int) -> Any:
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    per_layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    compared, identical, worst = 0, 0, 0.0
    missing: list[str] = []
    with safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as st:
        keys = set(st.keys())
        for t in GGUFReader(str(gguf)).tensors:
            if t.name.startswith("blk."):
                _, i, kind, _w = t.name.split(".")
                hf_name = f"model.layers.{i}.{per_layer[kind]}.weight"
            else:
                hf_name = names.get(t.name, t.name)
            if hf_name not in keys:
                missing.append(t.name)
                continue
            ours = st.get_tensor(hf_name)
            if t.name.endswith("attn_q.weight"):
                ours = permute(ours, heads)
            elif t.name.endswith("attn_k.weight"):
                ours = permute(ours, kv_heads)
            theirs = np.asarray(t.data, dtype=np.float32).reshape(ours.shape)
            compared += 1
            identical += int(np.array_equal(theirs, ours))
            worst = max(worst, float(np.max(np.abs(theirs - ours))))
    return {"tensors": compared, "identical": identical, "max_abs_diff": worst, "missing_in_ours": missing,
            "all_identical": compared > 0 and identical == compared and not missing}


def llama_bench(bin_dir: Path, gguf: Path, n: int, threads: int, reps: int) -> dict[str, Any]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    idle = wait_idle()
    meter = CpuMeter([])  # llama-bench is a waited-for child: its CPU time lands in ours
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    during = meter.stop()
    if done.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({done.returncode}): {done.stderr[-2000:]}")
    rows = [r for r in json.loads(done.stdout) if r.get("n_gen") == n and r.get("n_prompt") == 0]
    assert rows, f"no tg{n} row in llama-bench's output: {done.stdout[:500]}"
    r = rows[0]
    return {"cmd": " ".join(cmd[1:]), "tokens_per_s": r["avg_ts"], "stddev_tokens_per_s": r["stddev_ts"],
            "samples_tokens_per_s": r.get("samples_ts"), "ms_per_token": 1e3 / r["avg_ts"],
            "threads": r.get("n_threads"), "build": r.get("build_commit"), "cpu": r.get("cpu_info"),
            "type": r.get("model_type"), "idle": idle, "during": during}


def die_with_parent() -> None:
    """In llama-server's process before exec: SIGTERM when the phase that started it dies, even by the SIGKILL of
    bench.run's phase timeout, so no llama-server outlives its phase (Linux: PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class LlamaServer:
    def __init__(self, bin_dir: Path, gguf: Path, slots: int, threads: int, log_path: Path,
                 slot_context: int = SLOT_CONTEXT, prompt_cache: bool = False) -> None:
        """`prompt_cache`: keep llama-server's prompt cache (--cache-ram at its default) for the prefix phase
        (bench/multiturn.py); the throughput runs turn it off, as their requests turn cache_prompt off."""
        self.port = free_port()
        self.cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                    "-np", str(slots), "-c", str(slots * slot_context), "-t", str(threads), "-tb", str(threads),
                    *([] if prompt_cache else ["--cache-ram", "0"]), "--no-webui"]
        self.log = open(log_path, "a")  # noqa: SIM115
        self.log.write(f"\n$ {' '.join(self.cmd)}\n")
        self.log.flush()
        # preexec_fn is safe here: servers start from the main thread, while no client thread runs.
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)  # noqa: PLW1509

    def wait_ready(self, timeout: float = 120.0) -> None:
        t = time.monotonic()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if self.request("GET", "/health", None)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama-server not ready after {timeout} s")

    def request(self, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, None if body is None else json.dumps(body),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data[:1] in (b"{", b"[") else data
        finally:
            conn.close()

    def stop(self) -> None:
        stop_process(self.proc, self.log)


def stream(port: int, ids: list[int], index: int, n: int, cache_prompt: bool = False) -> dict[str, Any]:
    """One streaming /completion request, timed by StreamTimer from the moment it is sent; with its text and
    llama-server's own account of it (`timings`: cache_n prompt positions reused, prompt_n computed, prompt_ms)."""
    body = {"prompt": ids, "n_predict": n, "stream": True, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
            "cache_prompt": cache_prompt, "return_tokens": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    timer = StreamTimer(index)
    final: dict[str, Any] = {}
    text: list[str] = []
    try:
        conn.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"/completion answered {resp.status}: {resp.read()[:500]!r}")
        buf = b""
        while not final:
            chunk = resp.read1(65536)
            if not chunk:
                break
            buf += chunk
            while b"\n\n" in buf and not final:
                event, buf = buf.split(b"\n\n", 1)
                if not event.startswith(b"data: "):
                    continue
                msg = json.loads(event[6:])
                text.append(msg.get("content") or "")
                if msg.get("stop"):
                    final = msg  # the final event repeats nothing already streamed
                else:
                    timer.tokens(msg.get("tokens") or [])
    finally:
        conn.close()
    assert final, "the stream ended without a final event"
    return timer.done(tokens_predicted=final.get("tokens_predicted"), timings=final.get("timings"),
                      tokens_cached=final.get("tokens_cached"), text="".join(text))


def run_clients(port: int, prompts: list[list[int]], plan: list[list[int]], stagger_s: float) -> list[dict[str, Any]]:
    """bench.load's closed loop with threads: worker w starts at w * stagger_s, prompt w + j for its j-th request."""
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Event()

    def worker(w: int, lengths: list[int]) -> None:
        go.wait()
        if stagger_s:
            time.sleep(w * stagger_s)
        try:
            for j, n in enumerate(lengths):
                i = (w + j) % len(prompts)
                r = stream(port, prompts[i], i, n)
                with lock:
                    results.append(r)
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w, lengths), daemon=True) for w, lengths in enumerate(plan)]
    for th in threads:
        th.start()
    go.set()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def variant(bin_dir: Path, name: str, gguf: Path, args: argparse.Namespace, short: list[list[int]],
            long: list[list[int]], texts: list[str], logdir: Path, save: Callable[[dict[str, Any]], None]
            ) -> dict[str, Any]:
    """One GGUF: llama-bench, then llama-server at each concurrency; `save` gets the partial result after each."""
    res: dict[str, Any] = {"gguf": str(gguf), "size_bytes": gguf.stat().st_size}
    if args.bench_reps:
        res["bench"] = llama_bench(bin_dir, gguf, args.new_tokens, args.threads, args.bench_reps)
        log(f"  llama-bench {name}: {res['bench']['tokens_per_s']:.1f} tok/s")
        save(res)
    res["server"] = {}
    log_path = logdir / f"llama-server-{name}.log"
    for c in args.concurrency:
        server = LlamaServer(bin_dir, gguf, c, args.threads, log_path)
        try:
            server.wait_ready()
            if "tokenize" not in res:  # does llama.cpp's tokenizer give our ids for the prompt texts?
                theirs = [server.request("POST", "/tokenize", {"content": t, "add_special": False})[1]["tokens"]
                          for t in texts]
                ours = short + long
                res["tokenize"] = {"prompts": len(texts),
                                   "same_ids": sum(a == b for a, b in zip(theirs, ours, strict=True))}
            stream(server.port, short[0], 0, 4)  # warm-up
            idle = wait_idle()
            meter = CpuMeter([server.proc.pid])
            agg = aggregate(run_clients(server.port, short, [[args.new_tokens]] * c, 0), c)
            agg["idle"], agg["during"] = idle, meter.stop()
            res["server"][str(c)] = agg
            log(f"  llama-server {name} -np {c}: {agg['tokens_per_s']:.1f} tok/s")
            if c == 8 and args.arrivals_requests:
                plan = arrival_plan(8, args.arrivals_requests, args.new_tokens, args.jitter, args.seed)
                idle = wait_idle()
                meter = CpuMeter([server.proc.pid])
                agg = aggregate(run_clients(server.port, long, plan, args.stagger_s), 8, samples=True)
                agg.update(idle=idle, during=meter.stop(), stagger_s=args.stagger_s, jitter=args.jitter, concurrency=8,
                           requests_per_worker=args.arrivals_requests, new_tokens=args.new_tokens, prompts="long")
                res["arrivals"] = agg
        finally:
            server.stop()
        save(res)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.peers_llamacpp")
    p.add_argument("--model-dir", required=True, help="our model directory: its tokenizer gives the prompt ids")
    p.add_argument("--out", required=True)
    p.add_argument("--variants", default="f32,q4_1")
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8, 16, 32])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--bench-reps", type=int, default=5, help="llama-bench repetitions (0: skip llama-bench)")
    p.add_argument("--arrivals-requests", type=int, default=3, help="requests per client in the arrivals run")
    p.add_argument("--stagger-s", type=float, default=0.2)
    p.add_argument("--jitter", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-weights-check", dest="weights_check", action="store_false")
    args = p.parse_args(argv)
    model_dir = Path(args.model_dir)
    logdir = Path(args.out).parent
    t = time.perf_counter()
    bin_dir = build()
    q4 = smollm2_gguf()
    result: dict[str, Any] = {"bin": str(bin_dir), "build_s": time.perf_counter() - t, "threads": args.threads,
                              "slot_context": SLOT_CONTEXT, "new_tokens": args.new_tokens}
    t = time.perf_counter()
    files = {"f32": f32_gguf(bin_dir, q4), "q4_1": q4}
    result["f32_s"] = time.perf_counter() - t
    if args.weights_check:
        result["weights_check"] = weights_check(files["f32"], model_dir)
        log(f"  F32 GGUF vs our safetensors: {result['weights_check']}")
    write_json(args.out, result)
    short, long = encode_prompts(model_dir, "short"), encode_prompts(model_dir, "long")
    texts = prompt_set("short") + prompt_set("long")
    for name in [v for v in args.variants.split(",") if v]:
        if name not in files:
            raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(files)}")
        def save(partial: dict[str, Any], name: str = name) -> None:
            result[name] = partial
            write_json(args.out, result)  # partial results survive a later failure or timeout

        variant(bin_dir, name, files[name], args, short, long, texts, logdir, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
