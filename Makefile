# sglora — build, run, test and model-pipeline entry points. `make help` lists them.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
REQ_HASH := $(shell sha256sum models/requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/sglora/venv-$(REQ_HASH)
VPY := $(VENV)/bin/python
BUNDLE ?= models/default
DESC ?= Given the name of an animal, find the broader category it is a kind of.

.PHONY: help build run test test-rust test-peft test-tiny-parity lint fmt venv models models-tiny deps-apt clean

help:
	@echo "make run [DESC='...']  generate an adapter with the bundled default model"
	@echo "make test              lint + Rust tests + PEFT load check (what CI runs)"
	@echo "make models            rebuild models/default with the full pipeline (hours, resumable)"
	@echo "make models-tiny       the pipeline's --tiny smoke run (minutes)"
	@echo "make venv              create the pinned Python virtualenv ($(VENV))"

build:
	$(CARGO) build --bins

run: build
	rm -rf target/example-adapter
	$(CARGO) run --quiet -- --bundle $(BUNDLE) generate "$(DESC)" -o target/example-adapter

# The test command (README, .ci/run).
test: lint test-rust test-peft

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

test-rust:
	$(CARGO) test

test-peft: venv build
	rm -rf target/peft-check && mkdir -p target/peft-check
	$(VPY) tests/peft_check.py --sglora target/debug/sglora --bundle $(BUNDLE) --work target/peft-check

# Parity of the Rust side with a freshly built tiny bundle (CI runs it after models-tiny).
test-tiny-parity:
	SGLORA_TEST_BUNDLE=models/work/tiny/bundle SGLORA_TEST_FIXTURES=models/work/tiny/fixtures $(CARGO) test --test parity

venv: $(VENV)/.ok

$(VENV)/.ok: models/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r models/requirements.txt
	touch $@

deps-apt:
	@test -e /usr/share/wordnet/data.noun || (apt-get update -q && apt-get install -y -q wordnet-base)

models: venv deps-apt
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run

models-tiny: venv deps-apt
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run --tiny

clean:
	$(CARGO) clean
	rm -rf models/work/tiny
