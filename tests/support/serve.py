"""The test-only entry point: `python -m service`, plus engine hooks driven through stdin.

    python -m tests.support.serve [--gated] [--probe KERNEL=MODULE:FUNCTION ...] [--kernel-cache FILE]
                                  [server flags...]

--probe replaces an optional kernel's child-process probe (service/engine/kernels.py), e.g. with one that dies by
SIGILL; --kernel-cache moves the probes' verdict cache, so that the probe really runs.

stdin commands, one per line, each answered by a line `ok` on stdout once done:
  step N          let the engine take N decode steps, and answer when it has taken them
  active N        answer once N sequences hold a slot
  waiting N       answer once N requests wait for a slot
  loading         answer once the model load has started (with --hold-load, it waits for `load`)
  load            let a held model load go on
  open | close    let the engine decode freely / only when permitted
Production entry points never take hooks; this module is the only way a server process gets them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from concurrent.futures import Future

from service.__main__ import prepare_process
from service.config import Config
from service.engine.api import EngineClient
from tests.support.hooks import StepGate


def _commands(gate: StepGate, engine: Future[EngineClient], loading: threading.Event,
              release: threading.Event) -> None:
    for line in sys.stdin:
        verb, *rest = line.split()
        if verb == "step":
            eng = engine.result()
            target = eng.stats().steps + int(rest[0])
            gate.permit(int(rest[0]))
            eng.wait_until(lambda s, target=target: s.steps >= target, 600)
        elif verb == "active":
            engine.result().wait_until(lambda s, n=int(rest[0]): s.active >= n, 600)
        elif verb == "waiting":
            engine.result().wait_until(lambda s, n=int(rest[0]): s.waiting >= n, 600)
        elif verb == "loading":
            loading.wait(600)
        elif verb == "load":
            release.set()
        elif verb in ("open", "close"):
            getattr(gate, verb)()
        print("ok", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--hold-load", action="store_true")
    parser.add_argument("--probe", action="append", default=[])
    parser.add_argument("--kernel-cache")
    own, rest = parser.parse_known_args()
    from pathlib import Path

    from service.engine import kernels

    for item in own.probe:
        name, _, spec = item.partition("=")
        kernels.PROBES[name] = spec
    if own.kernel_cache:
        kernels.default_cache_file = lambda: Path(own.kernel_cache)
    prepare_process()
    from service.config import load_config
    from service.server import load_engine, serve  # after prepare_process: Paddle loads here

    gate = StepGate(gated=own.gated)
    engine: Future[EngineClient] = Future()

    loading, release = threading.Event(), threading.Event()
    if not own.hold_load:
        release.set()

    def loader(config: Config) -> EngineClient:
        loading.set()
        release.wait()
        engine.set_result(load_engine(config, hooks=gate))
        return engine.result()

    threading.Thread(target=_commands, args=(gate, engine, loading, release), daemon=True).start()
    config = load_config(rest)
    try:
        asyncio.run(serve(config, loader=loader))
    except Exception as exc:
        logging.getLogger("tokenstream").error("fatal: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
