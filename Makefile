# sglora — build, run, test and model-pipeline entry points. `make help` lists them.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
REQ_HASH := $(shell sha256sum models/requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/sglora/venv-$(REQ_HASH)
VPY := $(VENV)/bin/python
BUNDLE ?= models/default
DESC ?= Given the name of an animal, find the broader category it is a kind of.

PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib
SYSCONFDIR ?= /etc
UNITDIR ?= $(LIBDIR)/systemd/system
DBUSDIR ?= $(PREFIX)/share/dbus-1
DOCDIR ?= $(PREFIX)/share/doc/sglora
PROFILE ?= release
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
BIN ?= $(TARGET_DIR)/$(PROFILE)/sglora

.PHONY: help build run test test-rust test-peft test-tiny-parity lint fmt venv models models-tiny deps-apt clean install uninstall verify-units aarch64

help:
	@echo "make run [DESC='...']  generate an adapter with the bundled default model"
	@echo "make test              lint + Rust tests + PEFT load check (what CI runs)"
	@echo "make models            rebuild models/default with the full pipeline (hours, resumable)"
	@echo "make models-tiny       the pipeline's --tiny smoke run (minutes)"
	@echo "make venv              create the pinned Python virtualenv ($(VENV))"

build:
	$(CARGO) build --bins

run: build
	rm -rf $(TARGET_DIR)/example-adapter
	$(CARGO) run --quiet -- --bundle $(BUNDLE) generate "$(DESC)" -o $(TARGET_DIR)/example-adapter

# The test command (README, .ci/run).
test: lint test-rust test-peft verify-units

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

fmt:
	$(CARGO) fmt

test-rust:
	$(CARGO) test

test-peft: venv build
	rm -rf $(TARGET_DIR)/peft-check && mkdir -p $(TARGET_DIR)/peft-check
	$(VPY) tests/peft_check.py --sglora $(TARGET_DIR)/debug/sglora --bundle $(BUNDLE) --work $(TARGET_DIR)/peft-check

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

# --- install on a board (or into DESTDIR for packaging) -------------------------------------
$(BIN):
	$(CARGO) build --profile $(PROFILE) --bin sglora

install: $(BIN)
	install -Dm755 $(BIN) $(DESTDIR)$(BINDIR)/sglora
	install -d $(DESTDIR)$(LIBDIR)/sglora/models/default
	install -m644 models/default/* $(DESTDIR)$(LIBDIR)/sglora/models/default/
	sed 's#@BINDIR@#$(BINDIR)#g' systemd/sglorad.service > sglorad.service.tmp
	install -Dm644 sglorad.service.tmp $(DESTDIR)$(UNITDIR)/sglorad.service && rm -f sglorad.service.tmp
	install -Dm644 systemd/org.sglora.Generator1.conf $(DESTDIR)$(DBUSDIR)/system.d/org.sglora.Generator1.conf
	install -Dm644 systemd/org.sglora.Generator1.service $(DESTDIR)$(DBUSDIR)/system-services/org.sglora.Generator1.service
	install -Dm644 systemd/sglora.sysusers $(DESTDIR)$(LIBDIR)/sysusers.d/sglora.conf
	install -Dm644 sglorad.toml.example $(DESTDIR)$(DOCDIR)/sglorad.toml.example
	install -Dm644 README.md $(DESTDIR)$(DOCDIR)/README.md
	test -e $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml || install -Dm644 sglorad.toml.example $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/sglora $(DESTDIR)$(UNITDIR)/sglorad.service
	rm -rf $(DESTDIR)$(LIBDIR)/sglora $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(DBUSDIR)/system.d/org.sglora.Generator1.conf $(DESTDIR)$(DBUSDIR)/system-services/org.sglora.Generator1.service
	rm -f $(DESTDIR)$(LIBDIR)/sysusers.d/sglora.conf
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml and /var/lib/sglora, /var/cache/sglora (remove by hand)"

# --- ARM boards (cross/README.md) ------------------------------------------------------------
aarch64:
	$(CARGO) build --profile board --target aarch64-unknown-linux-gnu --bin sglora
	@ls -l $(TARGET_DIR)/aarch64-unknown-linux-gnu/board/sglora

# systemd-analyze verify and the offline security score of the unit, against the debug binary.
verify-units: build
	rm -rf $(TARGET_DIR)/units && mkdir -p $(TARGET_DIR)/units
	sed 's#@BINDIR@#$(abspath $(TARGET_DIR))/debug#g' systemd/sglorad.service > $(TARGET_DIR)/units/sglorad.service
	cd $(TARGET_DIR)/units && systemd-analyze verify ./sglorad.service
	cd $(TARGET_DIR)/units && systemd-analyze security --offline=true --threshold=20 ./sglorad.service | tail -1

clean:
	$(CARGO) clean
	rm -rf models/work/tiny
