"""`python -m service` as a real subprocess, for signals, soak and multi-process tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def spawn(*args: str) -> tuple[subprocess.Popen, dict]:
    """Start the server and wait for its JSON 'listening' log line, which carries the bound ports."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'generated'}:{ROOT}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service", *args], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "listening":
                # Keep draining stderr so the server never blocks on a full pipe.
                threading.Thread(target=proc.stderr.read, daemon=True).start()
                return proc, entry
    raise RuntimeError(f"server exited with {proc.wait()} before listening")


def wait_serving(target: str, timeout: float = 300) -> None:
    """Block on Health.Watch until the server reports SERVING (the model is loaded and warm)."""
    with grpc.insecure_channel(target) as channel:
        for msg in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=timeout):
            if msg.status == health_pb2.HealthCheckResponse.SERVING:
                return
