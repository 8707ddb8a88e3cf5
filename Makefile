# euca-ha: the commands a developer and CI use. See README.md.
SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help deps venv lint unit integration molecule test demo down bench faults clean

help:
	@echo "make demo   - testbed hosts + site.yml + smoke check (root, Debian 12)"
	@echo "make test   - the whole suite: lint, unit, integration, molecule"
	@echo "make venv   - build .venv (no-op when current)"
	@echo "make down   - remove the demo testbed"
	@echo "make faults [SEED=n] [DURATION=s] - the randomized fault suite on a fresh testbed cloud"
	@echo "make bench [BENCH=name] - run the benchmarks (all, or one), regenerate docs/performance.md"

deps:
	@scripts/install-deps.sh

# The venv is rebuilt only when pyproject.toml or constraints.txt change.
$(VENV)/.stamp: pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade 'pip>=24' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c 'import euca_runtime, testbed, ansible, molecule, testinfra'
	@touch $@

venv: $(VENV)/.stamp

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy euca_runtime testbed
	$(BIN)/ansible-lint --profile production --offline
	@for p in playbooks/*.yml playbooks/runbooks/*.yml; do \
	  [ -e "$$p" ] || continue; \
	  $(BIN)/ansible-playbook --syntax-check -i inventories/example/ha.yml "$$p" >/dev/null || exit 1; \
	done; echo "syntax-check: ok"

unit: venv
	$(BIN)/pytest -q tests/unit

integration: deps venv
	$(BIN)/pytest -q tests/integration

molecule: deps venv
	cd $(CURDIR) && $(BIN)/molecule test --all </dev/null

test: deps venv lint
	$(BIN)/pytest -q --durations=25 tests </dev/null
	$(MAKE) --no-print-directory molecule

demo: deps venv
	$(BIN)/python -m testbed.demo

down: venv
	$(BIN)/python -m testbed down --name demo
	rm -rf $(HOME)/.euca-ha/pki/demo  # the demo cloud's CA: a new bed gets a new one

bench: deps venv
	$(BIN)/python -m benchmarks $(BENCH)
	$(BIN)/python -m benchmarks.report

# The long randomized fault set, on demand (root): a fresh testbed cloud, seeded faults for
# DURATION seconds, a result file under faults/results/. The quick set is tests/faults (make test).
SEED ?=
DURATION ?= 600
FAULTS_BED ?= flt
faults: deps venv
	$(BIN)/python -m faults $(if $(SEED),--seed $(SEED)) --duration $(DURATION) --bed $(FAULTS_BED)

clean: down
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
