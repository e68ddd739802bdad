"""The CPU container image, built here and run the way deploy/k8s runs it. `make image-test`; not in `make test`.

scripts/image.sh builds the Dockerfile's default target with rootful podman on a stand-in for its Python base image
(no registry is reachable). The container then gets what deploy/k8s/deployment.yaml gives it, read from the YAML:
env, ports, user and group, the container and pod security contexts (read-only root filesystem, all capabilities
dropped, no privilege escalation), a tmpfs for each emptyDir, its probes, its preStop hook and its termination grace
period. Not emulated: resource requests and limits (this machine has 2 cores; the manifest limits 4), and the
kubelet's own probe timing. Figures (build time, image size and what takes it, time to SERVING, the SIGTERM drain)
go to stdout and to build/image-test/report.json.

Skipped only where podman cannot be installed: not root, or no apt-get. TOKENSTREAM_IMAGE_TEST_REQUIRED=1 (set by
.ci/run) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.servers import wait_serving
from tokenstream.v1 import generation_pb2 as pb
from tokenstream.v1 import generation_pb2_grpc as pb_grpc

# The model the image serves by default: GetModelInfo must name it.
EXPECTED_MODEL = "smollm2-135m-instruct"

ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENT = ROOT / "deploy" / "k8s" / "deployment.yaml"
IMAGE = os.environ.get("TOKENSTREAM_IMAGE_TAG", "tokenstream:image-test")
OUT = ROOT / "build" / "image-test"
REQUIRED = os.environ.get("TOKENSTREAM_IMAGE_TEST_REQUIRED") == "1"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRAIN_STREAMS = 8
HANG_S = 600  # a wait that lasts this long is a hang, on any host this runs on
REPORT: dict[str, Any] = {}
# The first test also pays for installing podman, the stand-in base and a cold build (about 7 min here, loaded).
pytestmark = pytest.mark.timeout(3600)


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root: rootful podman, and apt-get to install it"
    if shutil.which("apt-get") is None:
        return "needs apt-get to install podman"
    return None


if (_reason := _cannot_run()) is not None:
    if REQUIRED:
        pytest.fail(f"image test required (TOKENSTREAM_IMAGE_TEST_REQUIRED=1) but it {_reason}", pytrace=False)
    pytest.skip(_reason, allow_module_level=True)


def report(key: str, value: Any) -> None:
    REPORT[key] = value
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(REPORT, indent=2) + "\n")
    print(f"\n[image-test] {key}: {json.dumps(value)}", flush=True)


# --- podman -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def podman_env() -> dict[str, str]:
    """Installs podman & co. where missing and returns an environment with its containers.conf (runc, ulimits)."""
    script = ROOT / "scripts" / "image.sh"
    env = {**os.environ, "PY": os.environ.get("PY", sys.executable)}
    start = time.monotonic()
    done = subprocess.run([script, "setup"], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, f"scripts/image.sh setup failed:\n{done.stderr}"
    report("setup_s", round(time.monotonic() - start, 1))
    return {**env, "CONTAINERS_CONF": done.stdout.strip().splitlines()[-1]}


def podman(env: dict[str, str], *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done


@pytest.fixture(scope="module")
def image(podman_env: dict[str, str]) -> dict[str, Any]:
    """Builds the image (stand-in base first, cached) and returns its config."""
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / "build.log"
    with log.open("w") as out:
        for step, args in (("standin_base_s", ["base"]), ("build_s", ["build", IMAGE])):
            start = time.monotonic()
            done = subprocess.run([ROOT / "scripts" / "image.sh", *args], env=podman_env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=3600, check=False)
            assert done.returncode == 0, f"image.sh {args[0]} failed; see {log}:\n{log.read_text()[-4000:]}"
            report(step, round(time.monotonic() - start, 1))
    (inspected,) = json.loads(podman(podman_env, "image", "inspect", IMAGE).stdout)
    report("image_size_mb", round(inspected["Size"] / 1e6))
    report("base_image", inspected["Config"].get("Labels", {}).get("org.tokenstream.standin", "official"))
    listing = podman(podman_env, "run", "--rm", "--entrypoint", "python", IMAGE, "-c", SIZES).stdout
    report("sizes_mb", json.loads(listing))
    return inspected


# What takes the image's space (du-like: allocated blocks): the base's /usr, the venv and its largest parts, the model.
SIZES = """
import json, os, sysconfig
def du(path):
    return sum(os.lstat(os.path.join(root, f)).st_blocks * 512 for root, _, files in os.walk(path) for f in files)
sp = sysconfig.get_paths()["purelib"]
paths = ["/usr", "/opt/venv", "/opt/tokenstream/models", sp + "/paddle/libs", sp + "/paddle/base"]
paths += [os.path.join(sp, name) for name in os.listdir(sp)]
sizes = sorted(((du(p), p.replace(sp, "site-packages")) for p in paths), reverse=True)
caches = sum(du(os.path.join(r, d)) for r, ds, _ in os.walk("/opt/venv") for d in ds if d == "__pycache__")
print(json.dumps({p: round(n / 2**20, 1) for n, p in sizes[:16]} | {"__pycache__ (all)": round(caches / 2**20, 1)}))
"""


# --- the manifest -------------------------------------------------------------------------------------------------


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity ("4Gi", "512M", "1000") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", str(text))
    assert match, f"deployment.yaml: cannot read the quantity {text!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


@dataclass
class PodSpec:
    """What deploy/k8s/deployment.yaml gives the tokenstream container, as `podman run` arguments."""

    pod: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    # Each secretKeyRef gets a fresh value here, as `kubectl create secret` would give it one.
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)  # mount paths of the emptyDir volumes
    run_args: list[str] = field(default_factory=list)

    @property
    def uid(self) -> int:
        return int(self.pod["securityContext"]["runAsUser"])

    @property
    def grpc_port(self) -> int:
        return next(int(p["containerPort"]) for p in self.container["ports"] if p.get("name") == "grpc")

    @property
    def http_port(self) -> int:
        return next(int(p["containerPort"]) for p in self.container["ports"] if p.get("name") == "http")

    @property
    def grace_period_s(self) -> int:
        return int(self.pod.get("terminationGracePeriodSeconds", 30))

    @property
    def token(self) -> str:
        """A bearer token the server accepts (the first of TOKENSTREAM_AUTH_TOKENS), or "" with auth off."""
        return self.env.get("TOKENSTREAM_AUTH_TOKENS", "").split(",")[0].strip()

    @property
    def auth(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def probes(self) -> dict[str, dict[str, Any]]:
        kinds = ("startupProbe", "readinessProbe", "livenessProbe")
        return {k: self.container[k] for k in kinds if k in self.container}


def read_pod_spec() -> PodSpec:
    doc = yaml.safe_load(DEPLOYMENT.read_text())
    pod = doc["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "tokenstream"]
    spec = PodSpec(pod=pod, container=container)
    args = spec.run_args

    psc = dict(pod.get("securityContext", {}))
    known_pod = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile"}
    assert set(psc) <= known_pod, f"deployment.yaml: pod securityContext {sorted(set(psc) - known_pod)} not emulated"
    assert psc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault"  # podman's default
    args += ["--user", f"{psc['runAsUser']}:{psc.get('runAsGroup', psc['runAsUser'])}"]
    if "fsGroup" in psc:
        args += ["--group-add", str(psc["fsGroup"])]

    csc = dict(container.get("securityContext", {}))
    known = {"allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities", "runAsNonRoot"}
    assert set(csc) <= known, f"deployment.yaml: container securityContext {sorted(set(csc) - known)} not emulated"
    if csc.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # writable only where the manifest mounts a volume
    if csc.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for cap in csc.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", cap]
    for cap in csc.get("capabilities", {}).get("add", []):
        args += ["--cap-add", cap]

    assert "envFrom" not in container, "deployment.yaml: envFrom is not emulated"
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:  # a Secret's key: a fresh random value, as the operator's `kubectl create secret` gives
            value = spec.secrets.setdefault((ref["name"], ref["key"]), secrets.token_hex(16))
        else:
            assert "value" in var, f"deployment.yaml: env {var['name']} is neither a value nor a secretKeyRef"
            value = str(var["value"])
        spec.env[var["name"]] = value
        args += ["--env", f"{var['name']}={value}"]

    for port in container.get("ports", []):
        assert port.get("protocol", "TCP") == "TCP"
        spec.ports.append(int(port["containerPort"]))
        args += ["--publish", f"127.0.0.1::{port['containerPort']}"]

    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume, f"deployment.yaml: volume {mount['name']} is not an emptyDir (not emulated)"
        size = volume["emptyDir"].get("sizeLimit")
        # An emptyDir starts empty and, with fsGroup, is writable by the pod: a tmpfs owned by the container user.
        opts = [f"destination={mount['mountPath']}", "U=true", "notmpcopyup"]
        opts += [f"tmpfs-size={quantity_bytes(size)}"] if size else []
        args += ["--mount", "type=tmpfs," + ",".join(opts)]
        spec.mounts.append(mount["mountPath"])
    return spec


@pytest.fixture(scope="module")
def pod_spec() -> PodSpec:
    return read_pod_spec()


# --- the running container ----------------------------------------------------------------------------------------


@dataclass
class Running:
    name: str
    env: dict[str, str]
    host_ports: dict[int, int]  # container port -> 127.0.0.1 port

    def target(self, container_port: int) -> str:
        return f"127.0.0.1:{self.host_ports[container_port]}"

    def exec(self, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman(self.env, "exec", self.name, *cmd, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def container(podman_env: dict[str, str], image: dict[str, Any], pod_spec: PodSpec) -> Iterator[Running]:
    name = f"tokenstream-image-test-{os.getpid()}"
    podman(podman_env, "rm", "--force", "--ignore", name)
    start = time.monotonic()
    # --health-interval disable: no systemd timer here; `podman healthcheck run` still runs the image's check.
    podman(podman_env, "run", "--detach", "--name", name, "--health-interval", "disable", *pod_spec.run_args, IMAGE)
    try:
        host_ports = {}
        for port in pod_spec.ports:
            mapped = podman(podman_env, "port", name, f"{port}/tcp").stdout.strip()
            host_ports[port] = int(mapped.rsplit(":", 1)[1])
        running = Running(name, podman_env, host_ports)
        startup = pod_spec.container["startupProbe"]
        # Within the startup probe's budget, as the kubelet allows.
        budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
        wait_serving(running.target(startup["grpc"]["port"]), budget, service=startup["grpc"].get("service", ""))
        report("serving_after_start_s", round(time.monotonic() - start, 2))
        yield running
    finally:
        logs = podman(podman_env, "logs", name, check=False)
        (OUT / "container.log").write_text(logs.stdout + logs.stderr)
        podman(podman_env, "rm", "--force", "--ignore", name, check=False)


# --- the checks, in order (the last one stops the container) ------------------------------------------------------


def test_image_matches_the_manifest(image: dict[str, Any], pod_spec: PodSpec) -> None:
    config = image["Config"]
    psc = pod_spec.pod["securityContext"]
    assert config["User"] == f"{psc['runAsUser']}:{psc['runAsGroup']}"
    assert psc["runAsNonRoot"] is True and pod_spec.uid != 0
    assert {f"{p}/tcp" for p in pod_spec.ports} <= set(config.get("ExposedPorts", {}))
    assert config.get("StopSignal") in (None, "SIGTERM", "15")
    # docker format: an OCI image config has no field for HEALTHCHECK, and it would be dropped.
    assert "docker" in image["ManifestType"]
    assert (image.get("Healthcheck") or {}).get("Test", [None])[0] == "CMD"
    assert pod_spec.grace_period_s > float(pod_spec.env.get("TOKENSTREAM_GRACE_S", "20"))
    # The baked-in model must stay visible with the manifest's volumes mounted: no mount may cover it.
    env = dict(item.split("=", 1) for item in config["Env"]) | pod_spec.env
    paths = {key: env[key] for key in ("TOKENSTREAM_MODEL_CACHE", "TOKENSTREAM_MODEL_DIR") if env[key].startswith("/")}
    assert paths == {"TOKENSTREAM_MODEL_CACHE": "/opt/tokenstream/models"}, paths  # MODEL_DIR is a name in it
    covered = {key: [m for m in pod_spec.mounts if Path(path).is_relative_to(m)] for key, path in paths.items()}
    assert covered == {key: [] for key in paths}, f"under a mounted volume, so hidden: {covered}"


def test_probes_and_healthcheck_pass(container: Running, pod_spec: PodSpec) -> None:
    probes = pod_spec.probes()
    assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in probes.items():
        assert "grpc" in probe, f"{kind} is not a gRPC probe"
        port = probe["grpc"]["port"]
        assert port in pod_spec.ports, f"{kind} probes port {port}, which the container does not declare"
        with grpc.insecure_channel(container.target(port)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                timeout=probe.get("timeoutSeconds", 1))
        assert reply.status == SERVING, kind
    done = podman(container.env, "healthcheck", "run", container.name, check=False)
    assert done.returncode == 0, f"the image's HEALTHCHECK failed: {done.stdout}{done.stderr}"


def metrics(container: Running) -> str:
    """The exposition where the pod's Prometheus annotations say."""
    annotations = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["metadata"]["annotations"]
    port, path = int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]
    with urllib.request.urlopen(f"http://{container.target(port)}{path}", timeout=10) as reply:
        return str(reply.read().decode())


def test_metrics_where_the_pod_annotations_say(container: Running, pod_spec: PodSpec) -> None:
    annotations = yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in pod_spec.ports
    assert "tokenstream_requests_total" in metrics(container)


def test_model_info_names_the_default_model(container: Running, pod_spec: PodSpec) -> None:
    with grpc.insecure_channel(container.target(pod_spec.grpc_port)) as channel:
        info = pb_grpc.GenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                                                   metadata=pod_spec.auth)
    report("model", {"name": info.model_name, "architecture": info.architecture, "vocab": info.vocab_size,
                     "context": info.max_context_length, "device": info.device, "dtype": info.dtype})
    assert info.model_name == EXPECTED_MODEL


def test_streams_a_request(container: Running, pod_spec: PodSpec) -> None:
    with grpc.insecure_channel(container.target(pod_spec.grpc_port)) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        request = pb.GenerateRequest(prompt="Once upon a time", stopping=pb.StoppingCriteria(
            max_new_tokens=24, min_new_tokens=24))
        # The manifest ships with auth on (a Secret's token): a call without it is refused.
        assert pod_spec.token == pod_spec.secrets["tokenstream-auth", "tokens"]
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(request, timeout=60))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        msgs = list(stub.Generate(request, timeout=60, metadata=pod_spec.auth))
    assert len(msgs) > 1  # streamed, not one answer
    assert msgs[-1].finish_reason == pb.FINISH_REASON_MAX_TOKENS
    assert msgs[-1].usage.completion_tokens == sum(len(m.tokens) for m in msgs) == 24
    text = "".join(m.text for m in msgs)
    assert len(text.split()) >= 8, text  # greedy (no sampling asked for): 24 tokens of an English continuation


def test_http_front_streams_a_chat_and_serves_the_page(container: Running, pod_spec: PodSpec) -> None:
    base = f"http://{container.target(pod_spec.http_port)}"
    body = json.dumps({"model": EXPECTED_MODEL, "stream": True, "max_tokens": 16, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    headers = {"Content-Type": "application/json"} | {k.title(): v for k, v in pod_spec.auth}
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.headers.get_content_type() == "text/event-stream"
        events = [line[len(b"data: "):] for line in reply.read().splitlines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert len(chunks) > 2 and "Paris" in text, text  # streamed, and the real model's answer
    with urllib.request.urlopen(f"{base}/", timeout=10) as reply:
        assert "text/html" in reply.headers.get("Content-Type", "")


def test_cli_inside_the_container(container: Running, pod_spec: PodSpec) -> None:
    target = f"127.0.0.1:{pod_spec.grpc_port}"
    done = container.exec("tokenstream", "--help")
    assert done.returncode == 0, done.stderr
    done = container.exec("tokenstream", "health", "--target", target)
    assert done.returncode == 0, done.stderr
    assert "SERVING" in done.stdout
    done = container.exec("tokenstream", "generate", "Once upon a time", "--max-new-tokens", "8", "--json",
                          "--target", target, "--token", pod_spec.token)
    assert done.returncode == 0, done.stderr
    # Eight tokens of the real model: its limit, or its end of text.
    assert json.loads(done.stdout.strip().splitlines()[-1])["finish_reason"] in ("MAX_TOKENS", "EOS_TOKEN")


def test_runs_confined(container: Running, pod_spec: PodSpec) -> None:
    """Non-root, no capabilities, read-only outside the volumes; and no trace of the build's pip settings."""
    done = container.exec("python", "-c", """
import json, os, pathlib
def writable(d):
    try:
        (pathlib.Path(d) / ".probe").touch(); (pathlib.Path(d) / ".probe").unlink(); return True
    except OSError:
        return False
caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]
print(json.dumps({"uid": os.getuid(), "caps": caps, "writable": {d: writable(d) for d in
    ['/', '/opt/tokenstream/models', '/opt/venv', '/etc', '/home/tokenstream', '/tmp']},
    "pip_conf": os.path.exists('/etc/pip.conf')}))
""")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] == pod_spec.uid
    assert all(int(c, 16) == 0 for c in seen["caps"]), seen["caps"]
    writable = {d for d, ok in seen["writable"].items() if ok}
    assert writable == set(pod_spec.mounts), f"writable {sorted(writable)}, volumes {pod_spec.mounts}"
    assert seen["pip_conf"] is False


def test_prestop_hook_runs(container: Running, pod_spec: PodSpec) -> None:
    command = pod_spec.container["lifecycle"]["preStop"]["exec"]["command"]
    done = container.exec(*command, timeout=pod_spec.grace_period_s)
    assert done.returncode == 0, f"preStop {command}: {done.stderr}"


def finished_calls(container: Running) -> int:
    """Generate calls the server has finished (tokenstream_requests_total, all labels): a call counts once its
    handler has taken the final message, before that message is sent."""
    lines = metrics(container).splitlines()
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith("tokenstream_requests_total{")))


def stop_in_background(container: Running, pod_spec: PodSpec) -> threading.Thread:
    """`podman stop`: the image's STOPSIGNAL, then SIGKILL after the grace period, as the kubelet does."""
    grace = pod_spec.grace_period_s
    thread = threading.Thread(target=podman, args=(container.env, "stop", "--time", str(grace), container.name),
                              kwargs={"timeout": grace + 60})
    thread.start()
    return thread


def test_sigterm_with_streams_in_flight_drains_and_exits_zero(container: Running, pod_spec: PodSpec) -> None:
    """In flight at SIGTERM by construction, not by a guess at the host's speed. Each stream has its own
    connection, with BDP probing off so that its HTTP/2 window keeps its initial size, and asks for as many tokens
    as the server allows, each with logprobs of its top alternatives: hundreds of kilobytes, several times what a
    window and the server's buffers hold. Its reader takes the first message and no more until the server has
    taken SIGTERM (health NOT_SERVING), so no handler can have taken its final message by then, however fast the
    host: the metrics say so, read before the readers go on. Then the drain must deliver every final message."""
    options = [("grpc.http2.bdp_probe", 0), ("grpc.use_local_subchannel_pool", 1)]  # one connection per stream
    with grpc.insecure_channel(container.target(pod_spec.grpc_port)) as channel:
        info = pb_grpc.GenerationServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                                                   metadata=pod_spec.auth)
        n = min(info.max_new_tokens, info.max_context_length - 32)
        request = pb.GenerateRequest(stopping=pb.StoppingCriteria(max_new_tokens=n, min_new_tokens=n),
                                     response=pb.ResponseOptions(logprobs=True, top_n=info.max_top_n))
        finished_before = finished_calls(container)
        started = [threading.Event() for _ in range(DRAIN_STREAMS)]
        sigterm_taken = threading.Event()
        streams: list[list[pb.GenerateResponse]] = [[] for _ in range(DRAIN_STREAMS)]
        errors: list[BaseException] = []

        def run(i: int) -> None:
            request_i = pb.GenerateRequest(prompt=f"stream {i}: once upon a time")
            request_i.MergeFrom(request)
            try:
                with grpc.insecure_channel(container.target(pod_spec.grpc_port), options=options) as own:
                    call = pb_grpc.GenerationServiceStub(own).Generate(
                        request_i, timeout=pod_spec.grace_period_s + HANG_S, metadata=pod_spec.auth)
                    streams[i].append(next(call))
                    started[i].set()
                    sigterm_taken.wait(HANG_S)
                    streams[i].extend(call)
            except BaseException as exc:
                errors.append(exc)
                started[i].set()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(DRAIN_STREAMS)]
        for t in threads:
            t.start()
        try:
            assert all(event.wait(HANG_S) for event in started)
            assert not errors, errors
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=HANG_S)
            assert next(health).status == SERVING
            start = time.monotonic()
            stop = stop_in_background(container, pod_spec)
            assert next(health).status == NOT_SERVING  # the server has taken SIGTERM and is draining
            try:
                in_flight = DRAIN_STREAMS - (finished_calls(container) - finished_before)
            except OSError as exc:  # with nothing to drain, the server exits at once
                raise AssertionError(f"no stream in flight at SIGTERM: the server had exited ({exc})") from exc
        finally:  # the readers go on, whatever happened
            sigterm_taken.set()
        for t in threads:
            t.join(HANG_S)
        stop.join(HANG_S)
        stop_s = time.monotonic() - start
    assert not errors, errors
    assert in_flight == DRAIN_STREAMS, f"{DRAIN_STREAMS - in_flight} streams finished before SIGTERM"
    state = json.loads(podman(container.env, "inspect", "--format", "{{json .State}}", container.name).stdout)
    finals = [msgs[-1] for msgs in streams]
    reasons = [pb.FinishReason.Name(f.finish_reason) for f in finals]
    report("sigterm_drain", {"streams": DRAIN_STREAMS, "in_flight": in_flight, "max_new_tokens": n,
                             "exit_s": round(stop_s, 2), "exit_code": state["ExitCode"], "finish_reasons": reasons,
                             "completion_tokens": [f.usage.completion_tokens for f in finals],
                             "kilobytes": [round(sum(m.ByteSize() for m in msgs) / 1e3) for msgs in streams]})
    assert all(f.finish_reason != pb.FINISH_REASON_UNSPECIFIED for f in finals), f"without a final message: {reasons}"
    assert state["ExitCode"] == 0
