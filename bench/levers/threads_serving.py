"""The two-core question end to end: a served model with the decoder on 1 or 2 threads (issue "Speed: use both cores").

    python -m bench.levers.threads_serving [--rounds 3] [--streams 1,8,32] [--new-tokens 64] [--model smollm2]
        [--variants t1,t2,t2_block0] [--json FILE]

`bench.levers.threads` times the step's matmuls alone; this runs the whole server (engine thread, event loop,
detokenizer) under `bench.load` (a closed loop in its own process, on the same machine), one server per variant,
all started once and then driven in interleaved rounds, so that a drift of the host's speed falls on every variant:
  t1        --decode-threads 1 (Intel OpenMP's default KMP_BLOCKTIME: an idle worker spins 200 ms)
  t2        --decode-threads 2
  t2_block0 --decode-threads 2 with KMP_BLOCKTIME=0: the second OpenMP worker sleeps as soon as a parallel region
            ends, so it does not spin on the core the event loop and the client need between matmuls
Each run records the idle check before it and the CPU others took during it (bench.common); medians over the quiet
runs, and the ratio to t1 per round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import REPO, bench_env, engine_model_path, free_port, median, quiet_run, stop_process
from bench.host import cpu_name, loadavg
from tests.support.servers import wait_serving

VARIANTS: dict[str, dict[str, str]] = {
    "t1": {"TOKENSTREAM_DECODE_THREADS": "1"},
    "t2": {"TOKENSTREAM_DECODE_THREADS": "2"},
    "t2_block0": {"TOKENSTREAM_DECODE_THREADS": "2", "KMP_BLOCKTIME": "0"},
}


class Served:
    def __init__(self, name: str, extra_env: dict[str, str], model: str, logdir: Path) -> None:
        self.port = free_port()
        self.log = open(logdir / f"server-{name}.log", "w")  # noqa: SIM115
        env = {**bench_env(), **extra_env}
        cmd = [sys.executable, "-m", "service", "--port", str(self.port), "--model-dir",
               str(engine_model_path(model)), "--max-slots", "32", "--prefix-cache-mb", "0", "--grace-s", "1"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self) -> None:
        wait_serving(f"127.0.0.1:{self.port}")


def load(served: Served, streams: int, new_tokens: int, logdir: Path) -> dict[str, Any]:
    out = Path(tempfile.mkstemp(suffix=".json", dir=logdir)[1])
    subprocess.run([sys.executable, "-m", "bench.load", "--target", f"127.0.0.1:{served.port}", "--server-pid",
                    str(served.proc.pid), "--out", str(out), "--kind", "closed", "--concurrency", str(streams),
                    "--new-tokens", str(new_tokens), "--warmup"], cwd=REPO, env=bench_env(), check=True,
                   stdout=subprocess.DEVNULL)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", default="smollm2", help="a bench.common MODELS key")
    p.add_argument("--json")
    args = p.parse_args()
    names = args.variants.split(",")
    logdir = Path(tempfile.mkdtemp(prefix="threads-serving-"))
    servers = {n: Served(n, VARIANTS[n], args.model, logdir) for n in names}
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {n: {} for n in names}
    try:
        for s in servers.values():
            s.wait()
        for r in range(args.rounds):
            for streams in (int(x) for x in args.streams.split(",")):
                order = names if r % 2 == 0 else names[::-1]
                for n in order:
                    res = load(servers[n], streams, args.new_tokens, logdir)
                    row = {"round": r, "tok_s": res["tokens_per_s"], "ttft_ms_p50": res["ttft_ms"]["p50"],
                           "quiet": quiet_run(res), "idle": res.get("idle"), "during": res.get("during")}
                    runs[n].setdefault(streams, []).append(row)
                    print(f"round {r} streams {streams:>2} {n:<10} {row['tok_s']:7.1f} tok/s  TTFT p50 "
                          f"{row['ttft_ms_p50']:7.1f} ms  quiet={row['quiet']} during={row['during']}", flush=True)
    finally:
        for s in servers.values():
            stop_process(s.proc, s.log)
    table: dict[str, Any] = {}
    print(f"\n{cpu_name()}, {os.cpu_count()} CPUs, load {loadavg()}; medians over quiet runs (all runs if none)")
    for streams in runs[names[0]]:
        line = [f"{streams:>3} streams"]
        for n in names:
            rows = runs[n][streams]
            quiet = [x for x in rows if x["quiet"]] or rows
            tok = median([x["tok_s"] for x in quiet])
            ratios = [x["tok_s"] / b["tok_s"] for x, b in zip(rows, runs[names[0]][streams], strict=True)]
            table.setdefault(str(streams), {})[n] = {"tok_s": tok, "quiet_runs": sum(bool(x["quiet"]) for x in rows),
                                                     "runs": len(rows), "ratio_to_first_median": median(ratios)}
            line.append(f"{n} {tok:.1f} tok/s ({median(ratios):.2f}x, {len(quiet)}/{len(rows)} quiet)")
        print("  ".join(line))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "runs": runs, "table": table}, indent=1))


if __name__ == "__main__":
    main()
