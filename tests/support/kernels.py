"""Probes that fail the ways a real optional kernel can, for service/engine/kernels.py's child-process probe."""

from __future__ import annotations

import os
import signal


def die_by_sigill() -> None:
    """What Paddle's AVX-512 fused_rms_norm does on a CPU without AVX-512: the process dies by SIGILL."""
    os.kill(os.getpid(), signal.SIGILL)


def wrong_answer() -> None:
    raise AssertionError("fused_rms_norm: max |error| 0.5 against the reference (tolerance 1e-05)")


def passes() -> None:
    """A probe that passes, without touching Paddle."""
