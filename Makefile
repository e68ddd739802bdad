# tokenstream: one entry point for set-up, code generation, serving, tests and benchmarks.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: install serve test proto proto-check lint bench clean

# The venv is rebuilt whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m service

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Stubs are checked in; CI fails when regenerating them changes anything.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I proto --python_out=generated --pyi_out=generated \
	  --grpc_python_out=generated $$(find proto -name '*.proto' | sort)

proto-check: proto
	git diff --exit-code -- generated/
	test -z "$$(git status --porcelain -- generated/)"

lint: $(STAMP)
	$(VENV)/bin/buf lint
	$(VENV)/bin/buf format -d --exit-code

bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
