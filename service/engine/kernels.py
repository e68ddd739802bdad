"""Optional fused kernels, each proven in a child process before the server's own process calls it.

Paddle's CPU kernel for `fused_rms_norm` executes AVX-512 instructions: on a CPU without them the process dies by
SIGILL, which no `except` catches. So every optional kernel is first run by a throwaway child process against a
plain numpy reference; a crash, a hang or a wrong answer there selects the plain ops, and the server starts either
way. Verdicts are cached on disk per (CPU flags, Paddle build, probe), so the probe costs a child process (~3 s)
once per machine and Paddle version.

    python -m service.engine.kernels            # probe every kernel here and print the choices (nothing cached)
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from service.engine.api import KERNEL_MODES

log = logging.getLogger("tokenstream.kernels")

PROBE_TIMEOUT_S = 120.0  # an upper bound on a child that imports Paddle and runs one small op, not a speed guess

# Each optional kernel: the probe a child process runs ("module:function"; it raises on a wrong answer). Tests
# point an entry at a probe of their own (one that dies by SIGILL); production never changes this table.
PROBES: dict[str, str] = {
    "fused_rms_norm": "service.engine.kernels:probe_fused_rms_norm",  # paddle.incubate: AVX-512 on CPU
    "swiglu": "service.engine.kernels:probe_swiglu",  # a fused activation kernel
}


@dataclass(frozen=True)
class KernelChoice:
    name: str
    fused: bool
    reason: str


@dataclass(frozen=True)
class Kernels:
    """The optional kernels the decoder may call; the default is none of them (plain ops only)."""

    fused_rms_norm: bool = False
    swiglu: bool = False

    @staticmethod
    def from_choices(choices: Mapping[str, KernelChoice]) -> Kernels:
        return Kernels(**{name: c.fused for name, c in choices.items() if name in Kernels.__dataclass_fields__})


PLAIN = Kernels()


# -- the probes (run in the child) ---------------------------------------------------------------


def probe_fused_rms_norm() -> None:
    """fused_rms_norm with a residual against the formula, at the decoder's shapes (rows x hidden 576)."""
    import numpy as np
    import paddle
    from paddle.incubate.nn.functional import fused_rms_norm

    rng = np.random.default_rng(0)
    for rows in (1, 3, 40):
        x, r = (rng.standard_normal((rows, 576)).astype(np.float32) for _ in range(2))
        w = rng.uniform(0.5, 1.5, 576).astype(np.float32)
        out, res = fused_rms_norm(paddle.to_tensor(x), paddle.to_tensor(w), None, 1e-5, 1,
                                  residual=paddle.to_tensor(r))
        s = x.astype(np.float64) + r
        want = s / np.sqrt((s * s).mean(-1, keepdims=True) + 1e-5) * w
        _close("fused_rms_norm", out.numpy(), want, 1e-5)
        _close("fused_rms_norm residual", res.numpy(), s, 1e-6)


def probe_swiglu() -> None:
    """F.swiglu(gate, up) against silu(gate) * up."""
    import numpy as np
    import paddle
    import paddle.nn.functional as F

    rng = np.random.default_rng(1)
    for rows in (1, 40):
        a, b = (rng.standard_normal((rows, 1536)).astype(np.float32) for _ in range(2))
        out = F.swiglu(paddle.to_tensor(a), paddle.to_tensor(b)).numpy()
        a64 = a.astype(np.float64)
        _close("swiglu", out, a64 / (1 + np.exp(-a64)) * b, 1e-5)


def _close(what: str, got: object, want: object, tol: float) -> None:
    import numpy as np

    err = float(np.abs(np.asarray(got, dtype=np.float64) - np.asarray(want, dtype=np.float64)).max())
    if not err < tol:  # also catches NaN
        raise AssertionError(f"{what}: max |error| {err:.3g} against the reference (tolerance {tol:g})")


def _run_probe(spec: str) -> None:
    import paddle

    # Paddle's own handler reports a fatal signal at length (and under emulation was seen to hang instead of
    # exiting): the probe wants the plain death, which the parent reads as "killed by SIGILL".
    paddle.disable_signal_handler()
    module, _, func = spec.partition(":")
    getattr(importlib.import_module(module), func)()


# -- the choice (in the server) ------------------------------------------------------------------


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux), or an empty list where /proc/cpuinfo does not say."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


def _paddle_build() -> str:
    import paddle

    return f"{paddle.__version__}+{getattr(paddle.version, 'commit', '?')}"


def cache_key(spec: str) -> str:
    """What a verdict depends on: the CPU's flags and model, the Paddle build, Python, and the probe itself."""
    parts = [platform.machine(), platform.processor(), " ".join(cpu_flags()), _paddle_build(), sys.version, spec]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def default_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenstream" / "kernels.json"


def probe_in_child(spec: str, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """Run one probe in a child process: (passed, why)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "service.engine.kernels", "--probe", spec]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,  # noqa: S603 -- our own
                              check=False)
    except subprocess.TimeoutExpired:
        return False, f"the probe gave no answer in {timeout:.0f} s"
    if done.returncode < 0:
        sig = signal.Signals(-done.returncode).name
        why = " (an instruction this CPU does not have)" if sig == "SIGILL" else ""
        return False, f"the probe was killed by {sig}{why}"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"the probe failed: {tail[:300]}"
    return True, "the probe matched the plain reference in a child process"


def choose(mode: str = "auto", cache_file: Path | None = None, probes: Mapping[str, str] | None = None
           ) -> dict[str, KernelChoice]:
    """Decide each optional kernel: fused only in 'auto' mode and where its probe passed (from the cache, or a
    child process run now, in parallel for all kernels)."""
    probes = PROBES if probes is None else probes
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels: {mode!r} is not one of {', '.join(KERNEL_MODES)}")
    if mode == "plain":
        return {n: KernelChoice(n, False, "plain ops forced (--kernels plain)") for n in probes}
    cache_file = cache_file or default_cache_file()
    cached = _read_cache(cache_file)
    keys = {name: cache_key(spec) for name, spec in probes.items()}
    todo = [name for name in probes if keys[name] not in cached]
    if todo:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(todo)) as pool:
            results = dict(zip(todo, pool.map(lambda n: probe_in_child(probes[n]), todo), strict=True))
        for name, (ok, why) in results.items():
            cached[keys[name]] = {"kernel": name, "probe": probes[name], "fused": ok, "reason": why}
        _write_cache(cache_file, cached)
    out = {}
    for name in probes:
        entry = cached[keys[name]]
        why = entry["reason"] + ("" if name in todo else f" (cached in {cache_file})")
        if not entry["fused"] and name == "fused_rms_norm" and "avx512f" not in cpu_flags():
            why += "; this CPU has no avx512f"
        out[name] = KernelChoice(name, bool(entry["fused"]), why)
    return out


def select(mode: str = "auto") -> Kernels:
    """choose(), logged: one line per kernel saying which path it took and why."""
    choices = choose(mode)
    for c in choices.values():
        log.info("kernel %s: %s (%s)", c.name, "fused" if c.fused else "plain", c.reason,
                 extra={"fields": {"kernel": c.name, "fused": c.fused}})
    return Kernels.from_choices(choices)


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict[str, dict]) -> None:
    """Atomically (servers starting together may race; the last writer wins, and every verdict is right)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as exc:  # a read-only home: probe again next start
        log.warning("could not cache kernel probes in %s: %s", path, exc)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m service.engine.kernels")
    p.add_argument("--probe", help="run one probe here (module:function); exit 0 when it passes")
    args = p.parse_args(argv)
    if args.probe:
        _run_probe(args.probe)
        return 0
    for name, spec in PROBES.items():
        ok, why = probe_in_child(spec)
        print(f"{name}: {'fused' if ok else 'plain'} ({why})")  # noqa: T201 -- a command-line report
    return 0


if __name__ == "__main__":
    sys.exit(main())
