"""tokenstream: a command-line client for tokenstream.v1.GenerationService.

    tokenstream generate "Once upon a time" --max-new-tokens 64
    tokenstream generate "Hi" --json | jq .text
    tokenstream chat --system "You are terse."
    tokenstream tokenize "Hello world"
    tokenstream info
    tokenstream health

Exit status: 0 on success; 1 when a call fails (the gRPC status name, message and any field violations go to
stderr), or when health is not SERVING; 2 on bad usage; 3 when a stream ended with finish reason ERROR or CANCELLED;
130 when interrupted. chat: 0 after /exit or the end of its input, 130 after Ctrl-C at the prompt, and from a pipe
the status of the first turn that failed (see chat.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from tokenstream_client import __version__
from tokenstream_client._base import DEFAULT_TARGET
from tokenstream_client._terminal import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    StatusLine,
    delta_line,
    report_error,
    report_failed_stream,
)
from tokenstream_client.channel import TLSConfig
from tokenstream_client.chat import ChatOptions, ChatSession
from tokenstream_client.client import Client
from tokenstream_client.errors import TokenstreamError
from tokenstream_client.request import GenerateParams
from tokenstream_client.retry import RetryPolicy


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument("--target", default=os.environ.get("TOKENSTREAM_TARGET", DEFAULT_TARGET),
                      help="host:port, or dns:///name:port for round-robin (env TOKENSTREAM_TARGET; "
                           "default %(default)s)")
    conn.add_argument("--timeout", type=float, default=None,
                      help="deadline of the call in seconds, retries included (default: none for generate and each "
                           "chat answer, 10 s for the others)")
    conn.add_argument("--token", default=os.environ.get("TOKENSTREAM_TOKEN"),
                      help="bearer token sent as `authorization: Bearer` (env TOKENSTREAM_TOKEN)")
    conn.add_argument("--request-id",
                      help="x-request-id to send (default: a fresh one); chat sends ID-1, ID-2, ... per turn")
    conn.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="extra metadata; repeatable")
    conn.add_argument("--max-attempts", type=int, default=4,
                      help="attempts in all when a retry is safe (default %(default)s; 1: no retries)")
    conn.add_argument("--json", action="store_true", help="machine-readable output: JSON (lines for generate and chat)")
    tls = common.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS with the default root certificates")
    tls.add_argument("--tls-ca", help="PEM root certificates to verify the server with (implies --tls)")
    tls.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (with --tls-key)")
    tls.add_argument("--tls-key", help="PEM private key of the client certificate")
    tls.add_argument("--tls-server-name", help="verify the server as this name (testing)")
    return common


def _generation_options() -> argparse.ArgumentParser:
    generation = argparse.ArgumentParser(add_help=False)
    g = generation.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--temperature", type=float, help="0 or unset: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--stop", action="append", default=[], help="stop sequence; repeatable")
    g.add_argument("--include-stop", action="store_true", help="send a matched stop sequence as text")
    g.add_argument("--time-limit-ms", type=int, help="soft time limit: the stream ends with TIME_LIMIT")
    g.add_argument("--echo-prompt-tokens", action="store_true",
                   help="with --json: the first message carries the prompt's token ids as the server saw them "
                        "(chat template applied)")
    so = generation.add_argument_group("structured output (at most one)")
    so.add_argument("--json-schema", metavar="SCHEMA", help="the output is an instance of this JSON schema (its JSON "
                                                             "text, or @FILE)")
    so.add_argument("--json-object", action="store_true", help="the output is a JSON object")
    so.add_argument("--regex", help="the output fully matches this regular expression")
    so.add_argument("--choice", action="append", default=[], help="the output is one of these strings; repeatable")
    so.add_argument("--grammar", metavar="GRAMMAR", help="the output is in this Lark or GBNF grammar (text, or @FILE)")
    return generation


def build_parser() -> argparse.ArgumentParser:
    common, generation = _common_options(), _generation_options()
    parser = argparse.ArgumentParser(prog="tokenstream", description="Client for the tokenstream gRPC service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common, generation], help="stream a completion",
                         description="Stream a completion, printing text as it arrives.")
    gen.add_argument("prompt", help="the prompt; - reads it from stdin")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", help="system message, with --chat")
    gen.add_argument("--logprobs", action="store_true", help="report token log-probabilities (with --json)")
    gen.add_argument("--status", action=argparse.BooleanOptionalAction, default=None,
                     help="status line with TTFT and tokens/s on stderr (default: when stdout and stderr are a "
                          "terminal and not --json)")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat", parents=[common, generation], help="chat: multi-turn, with the history sent every turn",
        description="A multi-turn chat: each line is a user message, answered live; the history is sent as "
                    "`messages` every turn. Reads lines from stdin when it is not a terminal. Commands: /reset, "
                    "/help, /exit. Ctrl-C stops an answer (what arrived stays in the history); Ctrl-C or Ctrl-D at "
                    "the prompt quits.")
    chat.add_argument("--system", help="system message, sent first in every turn (kept by /reset)")
    chat.add_argument("--quiet", action="store_true",
                      help="no banner, and no TTFT and tokens/s after each answer (shown only on a terminal anyway)")
    chat.set_defaults(func=cmd_chat)

    tok = sub.add_parser("tokenize", parents=[common], help="tokenize a text")
    tok.add_argument("text", help="the text; - reads it from stdin")
    tok.add_argument("--truncate-to", type=int, default=0, help="keep only the last N tokens")
    tok.add_argument("--tokens", action="store_true", help="also show each token's string and offsets")
    tok.set_defaults(func=cmd_tokenize)

    info = sub.add_parser("info", parents=[common], help="describe the served model and limits")
    info.set_defaults(func=cmd_info)

    health = sub.add_parser("health", parents=[common], help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument("--service", default="", help="service name (default: the server as a whole)")
    health.set_defaults(func=cmd_health)
    return parser


def _client(args: argparse.Namespace) -> Client:
    tls: TLSConfig | None = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        tls = TLSConfig.from_files(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    headers = []
    for header in args.header:
        key, sep, value = header.partition("=")
        if not sep:
            raise ValueError(f"--header needs KEY=VALUE, got {header!r}")
        headers.append((key.strip(), value.strip()))
    return Client(args.target, tls=tls, token=args.token, metadata=headers,
                  retry=RetryPolicy(max_attempts=max(1, args.max_attempts)))


def _text_arg(value: str, inp: TextIO) -> str:
    return inp.read() if value == "-" else value


def _timeout(args: argparse.Namespace, default: float | None) -> float | None:
    return args.timeout if args.timeout is not None else default


def _sampling_params(args: argparse.Namespace) -> GenerateParams:
    """The generation flags that generate and chat share."""
    params: GenerateParams = {}
    for name in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                 "time_limit_ms"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.stop:
        params["stop"] = list(args.stop)
    if args.include_stop:
        params["include_stop_sequence"] = True
    if args.echo_prompt_tokens:
        params["echo_prompt_tokens"] = True
    if args.json_schema:
        params["json_schema"] = _file_or_text(args.json_schema)
    if args.json_object:
        params["json_object"] = True
    if args.regex:
        params["regex"] = args.regex
    if args.choice:
        params["choice"] = list(args.choice)
    if args.grammar:
        params["grammar"] = _file_or_text(args.grammar)
    return params


def _file_or_text(value: str) -> str:
    """A flag's text, or the contents of the file it names as @FILE."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def _generate_params(args: argparse.Namespace, inp: TextIO) -> tuple[str | None, GenerateParams]:
    prompt = _text_arg(args.prompt, inp)
    params = _sampling_params(args)
    if args.chat:
        turns = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        params["messages"] = turns
    if args.logprobs:
        params["logprobs"] = True
    return (None if args.chat else prompt), params


def cmd_generate(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    prompt, params = _generate_params(args, inp)
    status_on = args.status if args.status is not None else (out.isatty() and err.isatty() and not args.json)
    ends_with_newline = True

    def end_line() -> None:  # leave the terminal's cursor at the start of a line
        if not ends_with_newline and out.isatty():
            out.write("\n")
            out.flush()

    with _client(args) as client, contextlib.ExitStack() as stack:
        stream = stack.enter_context(client.generate(prompt, timeout=_timeout(args, None),
                                                     request_id=args.request_id, **params))
        status = stack.enter_context(StatusLine(err, shares_terminal=out.isatty())) if status_on else None
        try:
            for delta in stream:
                if status is not None:
                    status.on_delta(delta)
                if args.json:
                    out.write(delta_line(delta, stream.request_id))
                elif delta.text:
                    out.write(delta.text)
                    ends_with_newline = delta.text.endswith("\n")
                out.flush()
        except TokenstreamError as error:
            if status is not None:
                status.stop()
            end_line()
            return report_error(error, args.json, out, err)
        except KeyboardInterrupt:
            stream.close()  # cancel the call at once; the server stops decoding
            if status is not None:
                status.stop()
            end_line()
            err.write("cancelled\n")
            return EXIT_INTERRUPTED
        final = stream.final
        end_line()
        if status is not None:
            status.summary(final)
    return report_failed_stream(final, stream.request_id, err)


def cmd_chat(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    options = ChatOptions(
        params=_sampling_params(args), system=args.system, timeout=_timeout(args, None), request_id=args.request_id,
        json_output=args.json, stats=not (args.quiet or args.json) and out.isatty() and err.isatty(),
        banner=not args.quiet,
    )
    with _client(args) as client:
        return ChatSession(client, options, inp, out, err).run()


def cmd_tokenize(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        result = client.tokenize(_text_arg(args.text, inp), truncate_to=args.truncate_to, return_tokens=args.tokens,
                                 return_offsets=args.tokens, timeout=_timeout(args, 10.0), request_id=args.request_id)
    if args.json:
        out.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
    elif args.tokens:
        out.write(f"{result.token_count} tokens\n")
        for i, token_id in enumerate(result.ids):
            start, end = result.offsets[i] if i < len(result.offsets) else (0, 0)
            text = result.tokens[i] if i < len(result.tokens) else ""
            out.write(f"{token_id}\t{text!r}\t[{start}, {end})\n")
    else:
        out.write(f"{result.token_count} tokens\n{' '.join(map(str, result.ids))}\n")
    return EXIT_OK


def cmd_info(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        info = client.model_info(timeout=_timeout(args, 10.0), request_id=args.request_id)
    data: dict[str, Any] = info.to_dict()
    if args.json:
        out.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        width = max(map(len, data))
        out.writelines(f"{key.ljust(width)}  {value}\n" for key, value in data.items())
    return EXIT_OK


def cmd_health(args: argparse.Namespace, inp: TextIO, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        status = client.health(args.service, timeout=_timeout(args, 10.0))
    out.write((json.dumps({"status": status}) if args.json else status) + "\n")
    return EXIT_OK if status == "SERVING" else EXIT_ERROR


def main(
    argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    inp, out, err = stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, inp, out, err))
    except TokenstreamError as error:
        return report_error(error, args.json, out, err)
    except BrokenPipeError:  # e.g. piped into `head`: the stream was closed (cancelled) on the way out
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except (ValueError, OSError) as error:  # bad --header, unreadable TLS files
        err.write(f"error: {error}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.write("\ncancelled\n")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
