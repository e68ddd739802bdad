# tokenstream: one entry point for set-up, code generation, serving, tests, gates and benchmarks.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE_MODULES := clients/node/node_modules/.package-lock.json
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install serve test test-deep prepare prepare-llamacpp prepare-browser prepare-image proto proto-check lint \
	deploy-check image-test ci bench soak clean

# The venv is (re)built whenever pyproject.toml changes. `serve` needs only the runtime;
# the dev extra adds the test tools and the numerical references (paddleformers, torch CPU).
$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(STAMP): pyproject.toml $(VENV)/.runtime
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The Node client's test runs where node and npm exist; elsewhere it is skipped with a reason.
$(NODE_MODULES): clients/node/package-lock.json
	if command -v npm >/dev/null; then cd clients/node && npm ci --no-audit --no-fund --loglevel=error; fi

install: $(STAMP)

# Serves the default model on 127.0.0.1:50051 (gRPC) and 127.0.0.1:$(HTTP_PORT) (the OpenAI-compatible HTTP API
# and the chat page). Flags: make serve ARGS="--port 50052"; HTTP_PORT=0 turns the HTTP front off.
HTTP_PORT ?= 8000
serve: $(VENV)/.runtime
	@if [ "$(HTTP_PORT)" != 0 ]; then echo "Chat page: http://127.0.0.1:$(HTTP_PORT)/  (OpenAI API: http://127.0.0.1:$(HTTP_PORT)/v1)"; fi
	$(PY) -m service --http-port $(HTTP_PORT) $(ARGS)

# Slow preparations run here, outside any test's timeout, each with its own progress and cached (a second run takes
# a second): llama.cpp (the GGUF tests' dequantization reference and the bench's peer: ~10 min on 2 cores, once) and
# Debian's Chromium for the browser test (root and apt only). `make test` runs them first, and then a missing
# llama.cpp fails its tests instead of skipping them; .ci/run starts them beside the installs.
prepare: prepare-llamacpp prepare-browser
prepare-llamacpp:
	scripts/build_llamacpp.sh
prepare-browser:
	scripts/browser_packages.sh
# podman and the stand-in base image, for image-test
prepare-image:
	scripts/image.sh setup && scripts/image.sh base

test: $(STAMP) $(NODE_MODULES) prepare
	TOKENSTREAM_LLAMACPP_REQUIRED=1 $(PY) -m pytest $(PYTEST_ARGS)

# The property tests under hypothesis's "deep" profile (tests/conftest.py): 200 examples each, new ones every run,
# where `make test` runs the same 25. A failure prints the example and its @reproduce_failure blob.
DEEP_TESTS ?= tests/test_contract.py
test-deep: $(STAMP) $(NODE_MODULES) prepare
	HYPOTHESIS_PROFILE=deep TOKENSTREAM_LLAMACPP_REQUIRED=1 $(PY) -m pytest $(DEEP_TESTS) $(PYTEST_ARGS)

# Stubs are checked in; proto-check fails when regenerating them changes anything.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=generated --pyi_out=generated \
	  --grpc_python_out=generated $$(find proto -name '*.proto' | sort)

proto-check: proto
	git diff --exit-code -- generated/
	test -z "$$(git status --porcelain -- generated/)"

# Contract and code gates: buf lint/format, buf breaking against the last published contract (a tag, see
# .ci/contract-ref), ruff on all Python, mypy on the service and the clients.
lint: $(STAMP)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format -d --exit-code
	$(VENV)/bin/buf breaking --against ".git#tag=$$(.ci/contract-tag)"
	$(VENV)/bin/ruff check service clients tests bench scripts
	$(VENV)/bin/mypy service clients bench scripts

deploy-check: $(STAMP)
	VENV=$(VENV) .ci/check-deploy

# Builds the CPU image with podman (installed with apt where missing; needs root) and runs it as deploy/k8s does.
# Skipped where it cannot run, unless TOKENSTREAM_IMAGE_TEST_REQUIRED=1. Figures: build/image-test/report.json.
image-test: $(STAMP) prepare-image
	PY=$(PY) $(PY) -m pytest tests/image/check_image.py -s $(PYTEST_ARGS)

ci: lint proto-check deploy-check test

# make bench [PEERS=hf] [BENCH_ARGS=--quick]: results in bench/results/ (JSON) and a table of medians and ratios.
bench: $(STAMP)
	$(PY) -m bench.run $(if $(PEERS),--peers $(PEERS)) $(BENCH_ARGS)

# The 10-minute soak of 64 streams, deadlines following the machine (a 400-request version runs in `make test`).
soak: $(STAMP)
	$(PY) -m tests.soak --streams 64 --minutes 10 --out bench/results/soak.json

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis clients/node/node_modules
