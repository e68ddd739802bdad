# syntax=docker/dockerfile:1
#
# tokenstream: gRPC token-streaming server.
#
#   CPU (default, last stage):  docker build -t tokenstream:cpu .
#   GPU:                        docker build --target gpu -t tokenstream:gpu .
#
# Needs BuildKit (the default builder since Docker 23), which builds only the
# stages the chosen target needs, so a CPU build never pulls the GPU base.
# The gRPC stubs are checked in under generated/: there is no protoc step.

# Pin by tag; in CI also pin by digest (python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Official PaddlePaddle GPU image (Docker Hub paddlepaddle/paddle, tag pattern
# <version>-gpu-cuda<X.Y>-cudnn<X.Y>): ships the CUDA 12.6 and cuDNN 9.5
# runtime libraries. Check the tag exists for the Paddle release you pin.
ARG PADDLE_GPU_IMAGE=paddlepaddle/paddle:3.3.1-gpu-cuda12.6-cudnn9.5

# ---------------------------------------------------------------------------
# GPU builder: a venv with paddlepaddle-gpu instead of the CPU paddlepaddle.
# ---------------------------------------------------------------------------
FROM ${PADDLE_GPU_IMAGE} AS gpu-builder
# pyproject requires Python 3.11. Paddle's release images default to another
# Python, so name a 3.11 interpreter (with its venv module) that the image
# provides. Any CUDA 12.6 + cuDNN 9 base with Python 3.11 works the same way.
ARG GPU_PYTHON=python3.11
ARG PADDLE_GPU_VERSION=3.3.1
# paddlepaddle-gpu 3.x wheels are published on Paddle's own index, one per CUDA
# version (PyPI stops at 2.6); the exact pin keeps pip from taking PyPI's.
ARG PADDLE_GPU_INDEX=https://www.paddlepaddle.org.cn/packages/stable/cu126/
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "${GPU_PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# README.m[d] matches nothing (and is skipped) while the repo has no README.md.
COPY pyproject.toml README.m[d] ./
COPY generated/ generated/
COPY service/ service/
# Install every pyproject dependency except the CPU paddlepaddle, then
# paddlepaddle-gpu, then the project itself without dependencies.
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not re.match(r'paddlepaddle\b', d)))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --extra-index-url "${PADDLE_GPU_INDEX}" "paddlepaddle-gpu==${PADDLE_GPU_VERSION}" \
 && pip install --no-cache-dir --no-deps . \
 && rm /tmp/requirements.txt

# ---------------------------------------------------------------------------
# GPU runtime: docker build --target gpu
# ---------------------------------------------------------------------------
FROM ${PADDLE_GPU_IMAGE} AS gpu
RUN groupadd --system --gid 10001 tokenstream \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --create-home --home-dir /home/tokenstream --shell /usr/sbin/nologin tokenstream \
 && mkdir -p /home/tokenstream/.cache/tokenstream/models \
 && chown -R 10001:10001 /home/tokenstream
COPY --from=gpu-builder /opt/venv /opt/venv
# The trained demo model (5 MB) is the default; mount another and set TOKENSTREAM_MODEL_DIR to serve it.
COPY models/ /opt/tokenstream/models/
# DL3064 flags any name containing "TOKEN": here it is only the TOKENSTREAM_
# prefix of the server's settings, and none of these values is a secret
# (auth tokens come from a mounted file or a Secret at run time, never here).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tokenstream \
    XDG_CACHE_HOME=/home/tokenstream/.cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENSTREAM_HOST=0.0.0.0 \
    TOKENSTREAM_PORT=50051 \
    TOKENSTREAM_METRICS_PORT=9464 \
    TOKENSTREAM_MODEL_CACHE=/home/tokenstream/.cache/tokenstream/models \
    TOKENSTREAM_MODEL_DIR=/opt/tokenstream/models/tokenstream-demo \
    TOKENSTREAM_DEVICE=gpu \
    TOKENSTREAM_DTYPE=float16
WORKDIR /home/tokenstream
USER 10001:10001
EXPOSE 50051 9464
# gRPC health protocol, service "" (liveness), with grpcio-health-checking (a
# project dependency) instead of a downloaded grpc_health_probe binary.
# start-period covers a slow model load; plaintext only (with TLS on, probe
# from the orchestrator instead).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TOKENSTREAM_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM goes straight to Python (exec form, PID 1): it stops admitting,
# drains in-flight streams for TOKENSTREAM_GRACE_S, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# ---------------------------------------------------------------------------
# CPU builder: pip install . (paddlepaddle CPU wheel from PyPI).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY generated/ generated/
COPY service/ service/
RUN pip install --no-cache-dir .

# ---------------------------------------------------------------------------
# CPU runtime (default target): slim, no build tools, non-root.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 tokenstream \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --create-home --home-dir /home/tokenstream --shell /usr/sbin/nologin tokenstream \
 && mkdir -p /home/tokenstream/.cache/tokenstream/models \
 && chown -R 10001:10001 /home/tokenstream
COPY --from=builder /opt/venv /opt/venv
# The trained demo model (5 MB) is the default; mount another and set TOKENSTREAM_MODEL_DIR to serve it.
COPY models/ /opt/tokenstream/models/
# DL3064 false positive on the TOKENSTREAM_ prefix: no secret here (see gpu stage).
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tokenstream \
    XDG_CACHE_HOME=/home/tokenstream/.cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENSTREAM_HOST=0.0.0.0 \
    TOKENSTREAM_PORT=50051 \
    TOKENSTREAM_METRICS_PORT=9464 \
    TOKENSTREAM_MODEL_CACHE=/home/tokenstream/.cache/tokenstream/models \
    TOKENSTREAM_MODEL_DIR=/opt/tokenstream/models/tokenstream-demo \
    TOKENSTREAM_DEVICE=cpu \
    TOKENSTREAM_DTYPE=float32
WORKDIR /home/tokenstream
USER 10001:10001
EXPOSE 50051 9464
# See the gpu stage: gRPC health check of service "" with grpcio-health-checking.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TOKENSTREAM_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
