# Quick start: `make lab` (bring up the local lab with demo tenants) and `make test` (whole suite).
# Both install whatever is missing first: Debian packages, the virtualenv, the Kubernetes binaries.
SHELL := /bin/bash
PY_BASE ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: lab lab-down test unit netns lint deps system k8s bench-smoke clean

deps: system $(STAMP) k8s

system:
	@bash tools/install-system.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_BASE) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@$(PY) tools/ovs_c_json.py
	@touch $(STAMP)

k8s:
	@bash tools/build-k8s.sh >/dev/null

# The Kubernetes binaries of exactly this checkout's patch level (tools/patches).
K8S_ENV = NETCTL_K8S_BIN=$$(bash tools/build-k8s.sh)

lab: deps
	@$(K8S_ENV) $(VENV)/bin/netctl lab up --demo

lab-down:
	@$(VENV)/bin/netctl lab down

lint: $(STAMP)
	@$(VENV)/bin/ruff check netctl cni kproxy lb tests netns_tests bench
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

unit: $(STAMP)
	@$(PY) -m pytest -q tests

netns: deps
	@$(K8S_ENV) $(PY) -m pytest -q netns_tests --require-netns

test: deps lint
	@$(K8S_ENV) $(PY) -m pytest -q tests netns_tests --require-netns

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
