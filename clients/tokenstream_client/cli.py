"""tokenstream: a command-line client for tokenstream.v1.GenerationService.

    tokenstream generate "Once upon a time" --max-new-tokens 64
    tokenstream generate "Hi" --json | jq .text
    tokenstream tokenize "Hello world"
    tokenstream info
    tokenstream health

Exit status: 0 on success; 1 when a call fails (the gRPC status name, message and any field violations go to
stderr), or when health is not SERVING; 2 on bad usage; 3 when a stream ended with finish reason ERROR or CANCELLED;
130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Self, TextIO

from tokenstream_client import __version__
from tokenstream_client._base import DEFAULT_TARGET
from tokenstream_client.channel import TLSConfig
from tokenstream_client.client import Client
from tokenstream_client.errors import TokenstreamError
from tokenstream_client.messages import Delta, FinishReason
from tokenstream_client.request import GenerateParams
from tokenstream_client.retry import RetryPolicy

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STREAM_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
CLEAR_LINE = "\r\x1b[K"


class StatusLine:
    """TTFT and tokens/s on stderr, redrawn in place with carriage returns.

    When stdout is the same terminal, the line is only drawn while waiting for the first token (it would otherwise
    overwrite the streamed text) and once more, on a line of its own, at the end. When stdout goes elsewhere it is
    redrawn for every delta.
    """

    def __init__(self, err: TextIO, *, shares_terminal: bool, interval_s: float = 0.1) -> None:
        self.err = err
        self.shares_terminal = shares_terminal
        self.interval_s = interval_s
        self.start = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self._drawn = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="tokenstream-status", daemon=True)

    def __enter__(self) -> Self:
        self._ticker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._ticker.is_alive():
            self._ticker.join()
        with self._lock:
            self._clear()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self.first is None or not self.shares_terminal:
                    self._draw()

    def _draw(self) -> None:
        self.err.write(CLEAR_LINE + self.render())
        self.err.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.err.write(CLEAR_LINE)
            self.err.flush()
            self._drawn = False

    def on_delta(self, delta: Delta) -> None:
        """Call before writing the delta's text to stdout."""
        now = time.monotonic()
        with self._lock:
            if delta.tokens:
                if self.first is None:
                    self.first = now
                    if self.shares_terminal:
                        self._clear()
                self.last = now
                self.tokens += len(delta.tokens)
            if not self.shares_terminal:
                self._draw()

    def rate(self) -> float | None:
        """Decode rate in tokens/s, from the first token to the last."""
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    def render(self, final: Delta | None = None) -> str:
        if self.first is None:
            waited = time.monotonic() - self.start
            return f"waiting for the first token… {waited:.1f} s" if final is None else "no tokens"
        parts = [f"TTFT {1000.0 * (self.first - self.start):.0f} ms", f"{self.tokens} tokens"]
        rate = self.rate()
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        if final is not None and final.finish_reason is not None:
            parts.insert(0, final.finish_reason.value)
        return " · ".join(parts)

    def summary(self, final: Delta | None) -> None:
        self.stop()
        self.err.write(self.render(final) + "\n")
        self.err.flush()


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("connection")
    conn.add_argument("--target", default=os.environ.get("TOKENSTREAM_TARGET", DEFAULT_TARGET),
                      help="host:port, or dns:///name:port for round-robin (env TOKENSTREAM_TARGET; "
                           "default %(default)s)")
    conn.add_argument("--timeout", type=float, default=None,
                      help="deadline of the call in seconds, retries included (default: none for generate, 10 s for "
                           "the others)")
    conn.add_argument("--token", default=os.environ.get("TOKENSTREAM_TOKEN"),
                      help="bearer token sent as `authorization: Bearer` (env TOKENSTREAM_TOKEN)")
    conn.add_argument("--request-id", help="x-request-id to send (default: a fresh one)")
    conn.add_argument("--header", action="append", default=[], metavar="KEY=VALUE", help="extra metadata; repeatable")
    conn.add_argument("--max-attempts", type=int, default=4,
                      help="attempts in all when a retry is safe (default %(default)s; 1: no retries)")
    conn.add_argument("--json", action="store_true", help="machine-readable output: JSON (lines for generate)")
    tls = common.add_argument_group("TLS")
    tls.add_argument("--tls", action="store_true", help="use TLS with the default root certificates")
    tls.add_argument("--tls-ca", help="PEM root certificates to verify the server with (implies --tls)")
    tls.add_argument("--tls-cert", help="PEM client certificate for mutual TLS (with --tls-key)")
    tls.add_argument("--tls-key", help="PEM private key of the client certificate")
    tls.add_argument("--tls-server-name", help="verify the server as this name (testing)")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()
    parser = argparse.ArgumentParser(prog="tokenstream", description="Client for the tokenstream gRPC service.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", parents=[common], help="stream a completion",
                         description="Stream a completion, printing text as it arrives.")
    gen.add_argument("prompt", help="the prompt; - reads it from stdin")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", help="system message, with --chat")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--min-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, help="0 or unset: greedy")
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--repetition-penalty", type=float)
    gen.add_argument("--stop", action="append", default=[], help="stop sequence; repeatable")
    gen.add_argument("--include-stop", action="store_true", help="send a matched stop sequence as text")
    gen.add_argument("--time-limit-ms", type=int, help="soft time limit: the stream ends with TIME_LIMIT")
    gen.add_argument("--logprobs", action="store_true", help="report token log-probabilities (with --json)")
    gen.add_argument("--status", action=argparse.BooleanOptionalAction, default=None,
                     help="status line with TTFT and tokens/s on stderr (default: when stdout and stderr are a "
                          "terminal and not --json)")
    gen.set_defaults(func=cmd_generate)

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


def _text_arg(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _timeout(args: argparse.Namespace, default: float | None) -> float | None:
    return args.timeout if args.timeout is not None else default


def _report(error: TokenstreamError, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.json:
        out.write(json.dumps({"error": error.to_dict()}, ensure_ascii=False) + "\n")
        out.flush()
    err.write(f"error: {error.describe()}\n")
    if error.request_id:
        err.write(f"  (request id {error.request_id}, {error.attempts} attempt{'s' * (error.attempts != 1)})\n")
    err.flush()
    return EXIT_ERROR


def _generate_params(args: argparse.Namespace) -> tuple[str | None, GenerateParams]:
    prompt = _text_arg(args.prompt)
    params: GenerateParams = {}
    if args.chat:
        turns = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        params["messages"] = turns
    for name in ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty",
                 "time_limit_ms"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    if args.stop:
        params["stop"] = list(args.stop)
    if args.include_stop:
        params["include_stop_sequence"] = True
    if args.logprobs:
        params["logprobs"] = True
    return (None if args.chat else prompt), params


def cmd_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    prompt, params = _generate_params(args)
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
                    record = delta.to_dict()
                    if delta.is_final:
                        record["request_id"] = stream.request_id
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                elif delta.text:
                    out.write(delta.text)
                    ends_with_newline = delta.text.endswith("\n")
                out.flush()
        except TokenstreamError as error:
            if status is not None:
                status.stop()
            end_line()
            return _report(error, args, out, err)
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
    if final is not None and final.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
        detail = f": {final.error_message}" if final.error_message else ""
        err.write(f"error: the stream ended with {final.finish_reason.value}{detail} "
                  f"(request id {stream.request_id})\n")
        return EXIT_STREAM_FAILED
    return EXIT_OK


def cmd_tokenize(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        result = client.tokenize(_text_arg(args.text), truncate_to=args.truncate_to, return_tokens=args.tokens,
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


def cmd_info(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        info = client.model_info(timeout=_timeout(args, 10.0), request_id=args.request_id)
    data: dict[str, Any] = info.to_dict()
    if args.json:
        out.write(json.dumps(data, ensure_ascii=False) + "\n")
    else:
        width = max(map(len, data))
        out.writelines(f"{key.ljust(width)}  {value}\n" for key, value in data.items())
    return EXIT_OK


def cmd_health(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    with _client(args) as client:
        status = client.health(args.service, timeout=_timeout(args, 10.0))
    out.write((json.dumps({"status": status}) if args.json else status) + "\n")
    return EXIT_OK if status == "SERVING" else EXIT_ERROR


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args, out, err))
    except TokenstreamError as error:
        return _report(error, args, out, err)
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
