# offline-exhook: `make run` starts the service on the shipped config (SQLite, no server needed);
# `make test` sets everything up, starts MariaDB and Redis if they are not running, and runs all checks.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
CONFIG  ?= config.hocon
PROTOS  := protos/v2/exhook.proto protos/v3/exhook.proto
PB_STAMP := exhook/pb/.generated

.PHONY: run test venv proto lint typecheck pytest services bench clean constraints

run: $(PB_STAMP)
	$(BIN)/offline-exhook --config $(CONFIG)

test: $(PB_STAMP) services lint typecheck pytest

# constraints.txt: the exact versions the tests passed with (the Dockerfile installs the same)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,fast,bench]'
	touch $@

venv: $(VENV)/.installed

# The generated modules live under exhook/pb/v2 and exhook/pb/v3 (two files called
# exhook.proto would clash in protobuf's descriptor pool otherwise).
$(PB_STAMP): $(VENV)/.installed $(PROTOS)
	mkdir -p exhook/pb
	$(BIN)/python -m grpc_tools.protoc -Iexhook/pb=protos \
	    --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch $@

proto: $(PB_STAMP)

lint: $(VENV)/.installed
	$(BIN)/ruff check exhook storage tests $(wildcard bench)

typecheck: $(PB_STAMP)
	$(BIN)/mypy exhook storage

pytest: $(PB_STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

services:
	./scripts/start-services.sh

# tcpdump times the service's answers on the wire (the bench falls back to client round trips without it).
# About 15 minutes on 2 cores; BENCH_ARGS="--quick --backends sqlite" for a smoke run, "--help" for the options
# (BENCHMARKS.md, "How to run the benchmark").
bench: $(PB_STAMP) services
	command -v tcpdump >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tcpdump)
	$(BIN)/python -m bench $(BENCH_ARGS)

# after changing a dependency: install without the old pins, run `make test`, then pin what passed
constraints: $(VENV)/.installed
	{ sed -n '/^#/p' constraints.txt; $(BIN)/pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) exhook/pb build *.egg-info
