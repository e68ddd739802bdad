"""PNG charts of a bench run (matplotlib, Agg backend): `write_charts(results, outdir)` from bench.run, or

    python -m bench.charts bench/results/<stamp>-<mode>.json [--out bench/charts]

  throughput-<model>.png  aggregate tokens/s against concurrent streams, one line per engine (and llama-bench's
                          batch-1 figure as a marker)
  arrivals-<model>.png    TTFT and inter-token latency under arrivals at 8 streams, as empirical CDFs, for our
                          server and llama-server on the same plan
  prefix-<model>.png      prefix reuse (bench/multiturn.py): median TTFT per turn of the chats with reuse on, off and
                          llama-server's cache_prompt; the callers sharing a system prompt, first and later ones
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.common import engines, prefix_summary, quiet_run

STYLE: dict[str, dict[str, Any]] = {  # engine label (bench.common.engines) -> line style
    "tokenstream, in-process": {"color": "tab:blue", "marker": "o"},
    "tokenstream over gRPC": {"color": "tab:cyan", "marker": "s", "linestyle": "--"},
    "transformers generate()": {"color": "tab:orange", "marker": "^"},
    "llama.cpp F32 (llama-server)": {"color": "tab:green", "marker": "D"},
    "llama.cpp Q4_1 (llama-server)": {"color": "tab:olive", "marker": "v", "linestyle": ":"},
}


def busy(run: dict[str, Any]) -> bool:
    """Whether the machine was busy before this timing, or others took CPU during it."""
    return quiet_run(run) is False


def footer(fig: Any, host: dict[str, Any], note: str = "") -> None:
    load = host.get("loadavg_start") or [0.0]
    fig.text(0.99, 0.01, f"{note}{host.get('cpus')} CPUs ({host.get('cpu') or 'unknown CPU'}), load average "
             f"{load[0]:.1f} at the start of the run", ha="right", va="bottom", fontsize=6, color="gray")


def throughput(key: str, res: dict[str, Any], path: Path, host: dict[str, Any]) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    for label, runs in engines(res).items():
        pts = sorted((int(c), r["tokens_per_s"], busy(r)) for c, r in runs.items() if r and r.get("tokens_per_s"))
        if pts:
            style = STYLE.get(label, {})
            ax.plot([c for c, _, _ in pts], [t for _, t, _ in pts], label=label, **style)
            hollow = [(c, t) for c, t, b in pts if b]
            if hollow:
                ax.plot([c for c, _ in hollow], [t for _, t in hollow], linestyle="none", marker=style.get("marker"),
                        color=style.get("color"), markerfacecolor="white")
    for v, color in (("f32", "tab:green"), ("q4_1", "tab:olive")):
        b = (((res.get("llamacpp") or {}).get(v) or {}).get("bench")) or {}
        if b.get("tokens_per_s"):
            ax.plot([1], [b["tokens_per_s"]], marker="*", markersize=12, color=color, linestyle="none",
                    markerfacecolor="white" if busy(b) else color,
                    label=f"llama-bench {v.upper()} tg{res['plan']['new_tokens']}")
    cs = res["plan"]["sweep"]
    ax.set_xscale("log", base=2)
    ax.set_xticks(cs, [str(c) for c in cs])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{key}: fp32, greedy, {res['plan']['new_tokens']} new tokens per stream", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    footer(fig, host, "hollow markers: not quiet (the machine was busy before that timing, or others took CPU "
           "during it); ")
    fig.savefig(path)
    plt.close(fig)
    return path


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def ecdf(ax: Any, values: list[float], **kw: Any) -> None:
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", **kw)


def arrivals(key: str, res: dict[str, Any], path: Path, host: dict[str, Any]) -> Path | None:
    series = []
    a = res.get("arrivals") or {}
    if a.get("samples"):
        series.append(("tokenstream over gRPC", a))
    for v, label in (("f32", "llama.cpp F32 (llama-server)"), ("q4_1", "llama.cpp Q4_1 (llama-server)")):
        la = ((res.get("llamacpp") or {}).get(v) or {}).get("arrivals") or {}
        if la.get("samples"):
            series.append((label, la))
    if not series:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    for label, s in series:
        st = STYLE.get(label, {})
        ttft = s["samples"]["loaded_ttft_ms"] or s["samples"]["ttft_ms"]
        lt = s["loaded_ttft_ms"] if (s.get("loaded_ttft_ms") or {}).get("n") else s["ttft_ms"]
        ecdf(ax1, ttft, color=st.get("color"), label=f"{label}: p50 {ms(lt['p50'])}, p99 {ms(lt['p99'])} ms")
        it = s["itl_ms"]
        ecdf(ax2, [x for x in s["samples"]["itl_ms"] if x > 0], color=st.get("color"),
             label=f"{label}: p50 {ms(it['p50'])}, p99 {ms(it['p99'])} ms")
    ax1.set_xlabel("time to first token, ms (requests arriving while >= 4 others decode)")
    ax2.set_xlabel("inter-token latency, ms")
    ax2.set_xscale("log")
    for ax in (ax1, ax2):
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{key}: requests arriving at 8 streams (clients {a.get('stagger_s', 0) * 1e3:.0f} ms apart, "
                 f"~{a.get('new_tokens')} tokens +-{100 * a.get('jitter', 0):.0f}%, long prompts)", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    footer(fig, host)
    fig.savefig(path)
    plt.close(fig)
    return path


PREFIX_STYLE: dict[str, dict[str, Any]] = {  # prefix_summary's series -> label and style
    "on": {"label": "tokenstream, reuse on", "color": "tab:blue", "marker": "o"},
    "off": {"label": "tokenstream, reuse off", "color": "tab:gray", "marker": "s", "linestyle": "--"},
    "llama": {"label": "llama-server F32, cache_prompt", "color": "tab:green", "marker": "D"},
}
CALLER_BARS = (("shared", "shared scope"), ("on", "per-caller scope"), ("off", "reuse off"))


def prefix(key: str, res: dict[str, Any], path: Path, host: dict[str, Any]) -> Path | None:
    s = prefix_summary(res)
    if not s or not s["turns"]:
        return None
    p = res["prefix"]["plan"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=120, gridspec_kw={"width_ratios": [3, 2]})
    for name, style in PREFIX_STYLE.items():
        pts = [(row["turn"], row[name]["ttft_ms"], row[name]["quiet"]) for row in s["turns"] if row.get(name)]
        if not pts:
            continue
        kw = {k: v for k, v in style.items() if k != "label"}
        ax1.plot([t for t, _, _ in pts], [v for _, v, _ in pts], label=style["label"], **kw)
        hollow = [(t, v) for t, v, q in pts if not q]
        if hollow:
            ax1.plot([t for t, _ in hollow], [v for _, v in hollow], linestyle="none", marker=kw.get("marker"),
                     color=kw.get("color"), markerfacecolor="white")
    first_on = (s["turns"][0].get("on") or {}).get("ttft_ms")
    if first_on:
        ax1.axhline(1.5 * first_on, color="tab:red", linewidth=0.8, linestyle=":",
                    label="goal: 1.5x turn 1 with reuse on")
    ax1.set_xticks([row["turn"] for row in s["turns"]])
    ax1.set_xlabel(f"turn (+{p['user_tokens']} user tokens and a {p['reply_tokens']}-token reply each)")
    ax1.set_ylabel("time to first token, ms (median)")
    ax1.set_ylim(bottom=0)
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7, loc="upper left")
    ax1.set_title(f"{p['conversations']} chat(s), prompts to {s['turns'][-1]['on']['prompt_tokens']:.0f} tokens"
                  if s["turns"][-1].get("on") else "chats", fontsize=9)
    callers = s["callers"]
    width = 0.8 / len(CALLER_BARS)
    for i, (name, label) in enumerate(CALLER_BARS):
        for j, part in enumerate(("first", "others")):
            cell = (callers.get(name) or {}).get(part) or {}
            ax2.bar(j + (i - 1) * width, cell.get("ttft_ms") or 0, width, label=label if j == 0 else None,
                    color=PREFIX_STYLE["off" if name == "off" else "on"]["color"], alpha=0.5 if name == "on" else 1.0,
                    hatch="" if cell.get("quiet", True) else "//", edgecolor="white")
    ax2.set_xticks([0, 1], ["first caller", f"callers 2-{p['callers']}"])
    ax2.set_ylabel("time to first token, ms (median)")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(fontsize=7, loc="upper right")
    ax2.set_title(f"{p['callers']} callers, one {p['system_tokens']}-token system prompt", fontsize=9)
    fig.suptitle(f"{key}: prefix reuse, greedy, client TTFT", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    footer(fig, host, "hollow markers / hatched bars: not quiet; ")
    fig.savefig(path)
    plt.close(fig)
    return path


def write_charts(all_res: dict[str, Any], outdir: Path) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for key, res in all_res["models"].items():
        host = all_res.get("host") or {}
        if engines(res):
            paths.append(throughput(key, res, outdir / f"throughput-{key}.png", host))
        for chart in (arrivals, prefix):
            p = chart(key, res, outdir / f"{chart.__name__}-{key}.png", host)
            if p:
                paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.charts")
    p.add_argument("results", help="a bench/results/<stamp>-<mode>.json")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "charts"))
    args = p.parse_args(argv)
    for path in write_charts(json.loads(Path(args.results).read_text()), Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
