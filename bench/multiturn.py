"""Prefix reuse through the real server (issue #23, item 6): TTFT per turn of multi-turn chats, and of 8 callers
sharing a system prompt, with reuse on and off in one run; and the same chats on llama-server with cache_prompt.

    python -m bench.multiturn ours --targets on=HOST:PORT shared=HOST:PORT off=HOST:PORT --caller-key KEY --out F
    python -m bench.multiturn llamacpp --script OURS.json --bin LLAMA_BIN_DIR --gguf GGUF --out F

`ours` drives three servers that bench.run starts (the same model): `on` (reuse on, the default per-caller scope),
`shared` (--prefix-cache-scope shared) and `off` (--prefix-cache-mb 0). Every request names its caller in the
`--caller-key` metadata, which the servers trust from 127.0.0.1.
  chat     `conversations` chats of `turns` turns on `on` and `off`, alternated request by request (the order
           flips each turn) so host noise falls on both. Turn 1's prompt is "User: <user-tokens words>\\nAssistant:";
           each later turn's is the previous prompt + its reply (exactly reply-tokens, greedy, EOS suppressed) + the
           next user message. One caller per conversation.
  callers  `caller-rounds` rounds, each with a new system prompt of system-tokens: `callers` callers one after
           another send it with a question of their own, on `shared`, `on` (isolated: per-caller scope) and `off`.
Texts are words of bench.common's prompts, cut at an exact token count by the server's Tokenize. Written: every
request's client TTFT (send to first token), the server's TTFT, prompt and cached prompt tokens, idle check and CPU
meter; the user messages and system prompts (`script`), so `llamacpp` replays the same turns.
`llamacpp` starts llama-server with one slot whose context holds the longest conversation, its prompt cache on,
and sends each turn's prompt as token ids (llama-server's /tokenize of the same text, checked against our count)
to /completion with cache_prompt; its replies come back into the next prompt as ours do.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from pathlib import Path
from typing import Any

from bench.common import LONG_PROMPTS, PROMPTS, CpuMeter, log, wait_idle, write_json
from tests.support.load import StreamTimer

WORDS = sorted({w for p in PROMPTS + LONG_PROMPTS for w in re.findall(r"[a-z]+", p.lower())})
USER, ASSISTANT, SYSTEM = "User:", "\nAssistant:", "System:"
SERVERS = ("on", "shared", "off")
CONTEXT_ROUND = 256  # llama-server's context: the longest prompt + its reply + this, rounded up to a multiple of it


def first_prompt(user: str) -> str:
    return f"{USER}{user}{ASSISTANT}"


def next_prompt(prompt: str, reply: str, user: str) -> str:
    return f"{prompt}{reply}\n{USER}{user}{ASSISTANT}"


def caller_prompt(system: str, question: str) -> str:
    return f"{SYSTEM}{system}\n{USER}{question}{ASSISTANT}"


# -- ours --------------------------------------------------------------------------------------------------------

def sized_text(stub: Any, rng: random.Random, tokens: int) -> str:
    """" w1 w2 ...": random words cut after exactly `tokens` tokens of the server's tokenizer."""
    from tokenstream.v1 import generation_pb2 as pb

    text = " " + " ".join(rng.choice(WORDS) for _ in range(2 * tokens))
    r = stub.Tokenize(pb.TokenizeRequest(text=text, return_offsets=True))
    assert r.token_count >= tokens, f"{2 * tokens} words gave only {r.token_count} tokens"
    return text[: r.offsets[tokens - 1].end]


def generate(stub: Any, key: str, caller: str, prompt: str, reply: int, pids: list[int],
             timeout_s: float) -> dict[str, Any]:
    """One greedy request of exactly `reply` tokens, timed on the client."""
    from tokenstream.v1 import generation_pb2 as pb

    req = pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=reply, min_new_tokens=reply))
    meter = CpuMeter(pids)
    timer = StreamTimer()
    text, final = [], None
    for msg in stub.Generate(req, timeout=timeout_s, metadata=((key, caller),)):
        timer.tokens([t.id for t in msg.tokens])
        text.append(msg.text)
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            final = msg
    during = meter.stop()
    t = timer.done()
    assert final is not None, "the stream ended without a final message"
    assert t["ttft_s"] is not None, "the stream ended without a token"
    return {"ttft_ms": t["ttft_s"] * 1e3, "server_ttft_ms": final.timings.time_to_first_token_ms,
            "prompt_tokens": final.usage.prompt_tokens, "cached": final.usage.cached_prompt_tokens,
            "ids": t["ids"], "text": "".join(text), "during": during}


def policy(stub: Any) -> dict[str, Any]:
    from tokenstream.v1 import generation_pb2 as pb

    p = stub.GetModelInfo(pb.GetModelInfoRequest()).prefix_cache
    return {"budget_bytes": p.budget_bytes, "block_positions": p.block_positions, "scope": p.scope}


def order(names: tuple[str, ...], i: int) -> tuple[str, ...]:
    """Alternate which server goes first, so neither always follows the other."""
    return names if i % 2 == 0 else names[::-1]


def chat(stubs: dict[str, Any], args: argparse.Namespace, pids: list[int], script: dict[str, Any]
         ) -> dict[str, list[list[dict[str, Any]]]]:
    """Per server ("on", "off"), per conversation, per turn: the request's record."""
    names = ("on", "off")
    rows: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in names}
    for c, users in enumerate(script["users"]):
        prompts = {n: first_prompt(users[0]) for n in names}
        for n in names:
            rows[n].append([])
        for t in range(args.turns):
            idle = wait_idle()
            for n in order(names, t):
                r = generate(stubs[n], args.caller_key, f"chat-{c}", prompts[n], args.reply_tokens, pids, args.timeout)
                rows[n][c].append({**r, "turn": t + 1, "idle": idle})
                if t + 1 < args.turns:
                    prompts[n] = next_prompt(prompts[n], r["text"], users[t + 1])
            log(f"  chat {c + 1} turn {t + 1}: " + ", ".join(
                f"{n} {rows[n][c][-1]['ttft_ms']:.0f} ms ({rows[n][c][-1]['cached']} cached)" for n in names))
    return rows


def callers(stubs: dict[str, Any], args: argparse.Namespace, pids: list[int], script: dict[str, Any]
            ) -> dict[str, list[list[dict[str, Any]]]]:
    """Per server, per round, per caller (in the order they came): the request's record."""
    rows: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in SERVERS}
    for r, (system, questions) in enumerate(zip(script["systems"], script["questions"], strict=True)):
        for n in SERVERS:
            rows[n].append([])
        for i, question in enumerate(questions):
            idle = wait_idle()
            for n in order(SERVERS, i):
                rec = generate(stubs[n], args.caller_key, f"caller-{i}", caller_prompt(system, question),
                               args.caller_reply_tokens, pids, args.timeout)
                rows[n][r].append({**rec, "caller": i, "idle": idle})
        log(f"  callers round {r + 1}: " + ", ".join(
            f"{n} {[round(x['ttft_ms']) for x in rows[n][r]]} ms" for n in SERVERS))
    return rows


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import grpc

    from tokenstream.v1 import generation_pb2_grpc as pb_grpc

    targets = dict(t.split("=", 1) for t in args.targets)
    assert set(targets) == set(SERVERS), f"--targets: expected {', '.join(SERVERS)}, got {', '.join(targets)}"
    channels = {n: grpc.insecure_channel(t) for n, t in targets.items()}
    try:
        stubs = {n: pb_grpc.GenerationServiceStub(ch) for n, ch in channels.items()}
        rng = random.Random(args.seed)
        script = {
            "users": [[sized_text(stubs["on"], rng, args.user_tokens) for _ in range(args.turns)]
                      for _ in range(args.conversations)],
            "systems": [sized_text(stubs["on"], rng, args.system_tokens) for _ in range(args.caller_rounds)],
            "questions": [[sized_text(stubs["on"], rng, args.question_tokens) for _ in range(args.callers)]
                          for _ in range(args.caller_rounds)],
        }
        warmup = sized_text(stubs["on"], random.Random(-1), 2 * args.question_tokens)
        for n in SERVERS:  # one request each, unlike any timed prompt, before the timings
            generate(stubs[n], args.caller_key, "warmup", first_prompt(warmup), 2, args.server_pid, args.timeout)
        out: dict[str, Any] = {"plan": {k: v for k, v in vars(args).items() if k not in ("targets", "out")},
                               "policy": {n: policy(s) for n, s in stubs.items()}, "script": script}
        write_json(args.out, out)
        out["chat"] = chat(stubs, args, args.server_pid, script)
        write_json(args.out, out)
        out["callers"] = callers(stubs, args, args.server_pid, script)
        return out
    finally:
        for ch in channels.values():
            ch.close()


# -- llama-server ------------------------------------------------------------------------------------------------

def run_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    from bench.peers_llamacpp import LlamaServer, stream

    ours = json.loads(Path(args.script).read_text())
    plan, users = ours["plan"], ours["script"]["users"]
    reply = plan["reply_tokens"]
    longest = max((r["prompt_tokens"] for conv in ours.get("chat", {}).get("on", []) for r in conv), default=0)
    longest = max(longest, plan["turns"] * (plan["user_tokens"] + reply + 16))  # if ours did not get that far
    context = -(-(longest + reply + CONTEXT_ROUND) // CONTEXT_ROUND) * CONTEXT_ROUND  # replies may differ from ours
    out: dict[str, Any] = {"gguf": args.gguf, "slot_context": context, "threads": args.threads, "turns": plan["turns"],
                           "reply_tokens": reply}
    server = LlamaServer(Path(args.bin), Path(args.gguf), 1, args.threads, Path(args.out).with_suffix(".server.log"),
                         slot_context=context, prompt_cache=True)
    skip = {"--host", "--port"}  # as printed in the table: the flags that matter, the model by its file name
    out["cmd"] = " ".join(Path(a).name if a == args.gguf else a for i, a in enumerate(server.cmd[1:], 1)
                          if a not in skip and server.cmd[i - 1] not in skip)
    try:
        server.wait_ready()

        def ids_of(text: str) -> list[int]:
            return server.request("POST", "/tokenize", {"content": text, "add_special": False})[1]["tokens"]

        stream(server.port, ids_of(first_prompt(" warm up the server")), 0, 2, cache_prompt=True)
        ours_on = ours.get("chat", {}).get("on", [])
        rows: list[list[dict[str, Any]]] = []
        out["chat"] = rows  # written after every turn: a phase cut short by its timeout keeps what it measured
        for c, conv in enumerate(users):
            prompt = first_prompt(conv[0])
            rows.append([])
            for t in range(plan["turns"]):
                ids = ids_of(prompt)
                idle = wait_idle()
                meter = CpuMeter([server.proc.pid])
                r = stream(server.port, ids, 0, reply, cache_prompt=True)
                during = meter.stop()
                timings = r.get("timings") or {}
                mine = ours_on[c][t] if c < len(ours_on) and t < len(ours_on[c]) else {}
                rows[c].append({"turn": t + 1, "ttft_ms": r["ttft_s"] * 1e3, "prompt_tokens": len(ids),
                                "cached": timings.get("cache_n"), "prompt_n": timings.get("prompt_n"),
                                "prompt_ms": timings.get("prompt_ms"), "tokens_cached": r.get("tokens_cached"),
                                "ids": r["ids"], "same_prompt_tokens_as_ours": mine.get("prompt_tokens") == len(ids),
                                "same_reply_as_ours": mine.get("ids") == r["ids"], "idle": idle, "during": during})
                log(f"  llama-server chat {c + 1} turn {t + 1}: {rows[c][-1]['ttft_ms']:.0f} ms "
                    f"({rows[c][-1]['cached']} cached of {len(ids)})")
                write_json(args.out, out)
                if t + 1 < plan["turns"]:
                    prompt = next_prompt(prompt, r["text"], conv[t + 1])
    finally:
        server.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.multiturn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="engine", required=True)
    o = sub.add_parser("ours", help="our servers over gRPC")
    o.add_argument("--targets", nargs=3, required=True, help="on=HOST:PORT shared=HOST:PORT off=HOST:PORT")
    o.add_argument("--server-pid", type=int, nargs="*", default=[], help="counted as ours by the CPU meter")
    o.add_argument("--caller-key", required=True, help="the metadata key the servers take a caller's name from")
    o.add_argument("--conversations", type=int, default=3)
    o.add_argument("--turns", type=int, default=10)
    o.add_argument("--user-tokens", type=int, default=120)
    o.add_argument("--reply-tokens", type=int, default=30)
    o.add_argument("--callers", type=int, default=8)
    o.add_argument("--caller-rounds", type=int, default=2)
    o.add_argument("--system-tokens", type=int, default=600)
    o.add_argument("--question-tokens", type=int, default=40)
    o.add_argument("--caller-reply-tokens", type=int, default=8)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--timeout", type=float, default=300.0)
    o.add_argument("--out", required=True)
    ll = sub.add_parser("llamacpp", help="llama-server with cache_prompt, on the chats `ours` wrote")
    ll.add_argument("--script", required=True, help="the JSON that `ours` wrote (its user messages and replies)")
    ll.add_argument("--bin", required=True, help="llama.cpp's bin directory (scripts/build_llamacpp.sh)")
    ll.add_argument("--gguf", required=True)
    ll.add_argument("--threads", type=int, default=0, help="0: one per CPU")
    ll.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.engine == "ours":
        result = run_ours(args)
    else:
        args.threads = args.threads or os.cpu_count() or 1
        result = run_llamacpp(args)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
