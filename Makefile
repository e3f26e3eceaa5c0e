# sglora — build, run, test and model-pipeline entry points. `make help` lists them.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
REQ_HASH := $(shell sha256sum models/requirements.txt | cut -c1-12)
VENV ?= $(HOME)/.cache/sglora/venv-$(REQ_HASH)
VPY := $(VENV)/bin/python
BUNDLE ?= models/default
# The full pipeline's stage cache (hours of CPU): outside the clone, so `git clean` or a fresh
# checkout keeps it, like the virtualenv.
MODELS_WORK ?= $(HOME)/.cache/sglora/work-$(if $(TASKS),$(notdir $(abspath $(TASKS))),full)
# A library in the task format (models/TASKS.md) to build from instead of the WordNet suite, and
# the names of its tasks to hold out (default: its library.json's "unseen").
TASKS ?=
UNSEEN ?=
TASKS_ARGS = $(if $(TASKS),--tasks $(abspath $(TASKS)))$(if $(UNSEEN), --unseen $(UNSEEN))
FREEDICT ?= $(HOME)/.cache/sglora/tasks/freedict
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

.PHONY: help build run test test-build test-rust test-peft test-embed test-tiny-parity test-hot-add test-ray deps-ray tasks-freedict test-tasks lint fmt venv models models-tiny ablations-tiny deps-apt deps-cross deps-static clean install uninstall verify-units aarch64 x86_64-static armv7 test-aarch64 test-armv7 fidelity deb test-deb deps-deb bench soak fuzz

help:
	@echo "make run [DESC='...']  generate an adapter with the bundled default model"
	@echo "make test              lint + Rust tests + PEFT load check (what CI runs)"
	@echo "make models            rebuild models/default with the full pipeline (hours, resumable)"
	@echo "make models [RAY_ADDRESS=host:port]  ... the experts and oracles stages as Ray tasks on that cluster"
	@echo "make models TASKS=DIR [UNSEEN=a,b]  ... from your own library (models/TASKS.md)"
	@echo "make tasks-freedict    write the FreeDict translation library (15 tasks) to $(FREEDICT)"
	@echo "make models-tiny       the pipeline's --tiny smoke run (minutes)"
	@echo "make test-ray          the tiny run's experts on a local Ray cluster: byte-identical to the local path"
	@echo "make ablations-tiny    the ablations of models/README.md (LoRA-FA, prior corrections, recipe) on the tiny run"
	@echo "make venv              create the pinned Python virtualenv ($(VENV))"
	@echo "make bench [QUICK=1]   benchmarks against onnxruntime/PyTorch, writes BENCHMARKS.md"
	@echo "make soak              32 clients x 60 s, 100 SIGKILL cycles (RELIABILITY.md numbers)"
	@echo "make fuzz              property-based fuzzing of every parser, bounded time"
	@echo "make aarch64           static (musl) stripped board binary; also x86_64-static, armv7 (static glibc)"
	@echo "make test-aarch64      the library and parity tests, static, under qemu-aarch64"
	@echo "make test-armv7        the library and parity tests, static, under qemu-arm (digests included)"
	@echo "make fidelity          embeddings of 1,468 texts: integer vs int8 runtime vs PyTorch fp32"

build:
	$(CARGO) build --bins

run: build
	rm -rf $(TARGET_DIR)/example-adapter
	$(CARGO) run --quiet --bin sglora -- --bundle $(BUNDLE) generate "$(DESC)" -o $(TARGET_DIR)/example-adapter

# The test command (README, .ci/run).
test: lint test-rust test-peft test-embed verify-units

lint: venv
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check --config models/ruff.toml models tests examples
	$(VENV)/bin/ruff format --check --config models/ruff.toml models tests examples

fmt: venv
	$(CARGO) fmt
	$(VENV)/bin/ruff format --config models/ruff.toml models tests examples

test-rust:
	$(CARGO) test

# The test steps use the binary `cargo test` builds: `cargo build --bins` resolves features
# without the dev-dependencies and would build the tract crates a second time.
test-build:
	$(CARGO) test --no-run --quiet

test-peft: venv test-build
	rm -rf $(TARGET_DIR)/peft-check && mkdir -p $(TARGET_DIR)/peft-check
	$(VPY) tests/peft_check.py --sglora $(TARGET_DIR)/debug/sglora --bundle $(BUNDLE) --work $(TARGET_DIR)/peft-check

# `sglora embed --adapter` against sentence-transformers + PEFT on generated and foreign adapters,
# and the R@1 of the unseen tasks' adapters scored through it against PEFT (~2 min).
test-embed: venv test-build
	rm -rf $(TARGET_DIR)/embed-check && mkdir -p $(TARGET_DIR)/embed-check
	$(VPY) tests/embed_check.py --sglora $(TARGET_DIR)/debug/sglora --bundle $(BUNDLE) --work $(TARGET_DIR)/embed-check
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run embed-parity --sglora $(abspath $(TARGET_DIR))/debug/sglora \
	  --bundle $(abspath $(BUNDLE)) --work $(abspath $(TARGET_DIR))/embed-check/work --out $(abspath $(TARGET_DIR))/embed-check/parity.json

# Added experts, proved on the tiny run (after models-tiny): an unseen task's oracle, saved by PEFT,
# joins with `sglora experts add` (projection error 0), its requests are served before and after,
# and no other task's adapter changes unless it retrieves the new expert (models/README.md).
test-hot-add: venv test-build
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run hot-add --tiny --sglora $(abspath $(TARGET_DIR))/debug/sglora \
	  --bundle $(abspath models/work/tiny/bundle) --out $(abspath $(TARGET_DIR))/hot-add-tiny.json

# The integer kernels' fidelity gate (models/README.md, "Integer kernels"): 1,468 varied texts
# embedded by PyTorch fp32 and by the integer and int8 runtimes; writes target/fidelity.json.
fidelity: venv
	$(CARGO) build --release --example fidelity
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run fidelity --example $(abspath $(TARGET_DIR))/release/examples/fidelity \
	  --bundle $(abspath $(BUNDLE)) --work $(abspath $(TARGET_DIR))/fidelity-work --out $(abspath $(TARGET_DIR))/fidelity.json

# Parity of the Rust side with a freshly built tiny bundle (CI runs it after models-tiny).
test-tiny-parity:
	SGLORA_TEST_BUNDLE=models/work/tiny/bundle SGLORA_TEST_FIXTURES=models/work/tiny/fixtures $(CARGO) test -p sglora-cli --test parity

venv: $(VENV)/.ok

$(VENV)/.ok: models/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r models/requirements.txt
	touch $@

deps-apt:
	@test -e /usr/share/wordnet/data.noun || (apt-get update -q && apt-get install -y -q wordnet-base)

# Static (musl) builds: zig as the C compiler and linker for every target (cargo-zigbuild), both
# from PyPI into their own small venv; the Rust standard libraries for the musl targets; qemu-user
# to run the aarch64 tests (no sysroot: the binaries are static).
ZIG_TOOLS ?= $(HOME)/.cache/sglora/zig-0.17.1-zigbuild-0.24.1
ZIG := PATH=$(ZIG_TOOLS)/bin:$$PATH cargo-zigbuild
deps-static:
	@test -x $(ZIG_TOOLS)/bin/cargo-zigbuild || ($(PYTHON) -m venv $(ZIG_TOOLS) \
	  && $(ZIG_TOOLS)/bin/pip install -q ziglang==0.17.1 cargo-zigbuild==0.24.1)
	@command -v qemu-aarch64 >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user)
	rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl

# Cross toolchains (Debian: gcc and glibc's static libraries for armhf) and the Rust standard
# library for the armv7 (static glibc) build.
deps-cross:
	@command -v arm-linux-gnueabihf-gcc >/dev/null && command -v qemu-arm >/dev/null && test -e /usr/arm-linux-gnueabihf/lib/libc.a \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user)
	rustup target add armv7-unknown-linux-gnueabihf

# RAY_ADDRESS=host:port (or in the environment): the experts and oracles stages run as Ray tasks on
# that cluster, whose nodes have this venv's packages and models/requirements-ray.txt
# (models/README.md, "Scale-out"); results are cached per task as the local path caches them.
models: venv deps-apt $(if $(RAY_ADDRESS),deps-ray)
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run --work $(MODELS_WORK) $(TASKS_ARGS) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

# The second task family (models/TASKS.md): word translation from Debian's FreeDict dictionaries,
# 15 tasks written to $(FREEDICT); then e.g. make models TASKS=$(FREEDICT).
FREEDICT_DICTS := eng-deu eng-fra eng-spa eng-ita eng-nld eng-por eng-swe deu-eng fra-eng spa-eng ita-eng nld-eng por-eng swe-eng dan-eng
tasks-freedict: venv
	@missing=$$(for d in $(FREEDICT_DICTS); do test -e /usr/share/dictd/freedict-$$d.index || echo dict-freedict-$$d; done); \
	  [ -z "$$missing" ] || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing)
	cd models && $(VPY) -m pipeline.freedict --out $(FREEDICT)

# The optional Ray client and runtime, into the pipeline's venv.
deps-ray: venv $(VENV)/.ray-ok
$(VENV)/.ray-ok: models/requirements-ray.txt
	$(VPY) -m pip install -q -r models/requirements-ray.txt
	touch $@

# The second task family end to end on the tiny recipe (models/TASKS.md): the FreeDict library
# checked (read back exactly, broken copies refused), the pipeline run on it unchanged, the Rust
# parity tests on the bundle it built, and an adapter generated from it by the CLI.
TASKS_TINY := models/work/freedict-tiny
test-tasks: tasks-freedict test-build
	$(VPY) tests/tasks_check.py $(FREEDICT)
	$(MAKE) models-tiny TASKS=$(FREEDICT)
	SGLORA_TEST_BUNDLE=$(TASKS_TINY)/bundle SGLORA_TEST_FIXTURES=$(TASKS_TINY)/fixtures $(CARGO) test -p sglora-cli --test parity
	rm -rf $(TARGET_DIR)/freedict-adapter
	$(TARGET_DIR)/debug/sglora --bundle $(TASKS_TINY)/bundle generate "how do I say a word in Italian?" -o $(TARGET_DIR)/freedict-adapter
	test -s $(TARGET_DIR)/freedict-adapter/adapter_model.safetensors

# The tiny run's experts and oracles stages on a local Ray cluster (a head and two worker nodes,
# started and stopped by the script), mixed with the local path: byte-identical to models-tiny's.
test-ray: deps-ray
	RAY_ADDRESS= tests/ray_check.sh $(VPY) models/work/tiny

models-tiny: venv deps-apt
	cd models && OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.run --tiny $(TASKS_ARGS)

# The analyses of models/README.md on the tiny work folder (after models-tiny), so they cannot rot;
# on a full run: python -m pipeline.<name> --work <that run's work folder>. (ablate_pooled needs two
# experts of one relation, which the tiny suite does not have; it refuses with a message.)
ablations-tiny: venv
	cd models && for m in ablate_fa ablate_correction "ablate_recipe --epochs 1 --snapshots 1"; do \
	  OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.$$m --tiny --work work/tiny || exit 1; done

# --- benchmarks, soak, fuzz (BENCHMARKS.md, RELIABILITY.md) --------------------------------
BENCH_DIR := $(abspath $(TARGET_DIR))/bench

bench: venv
	mkdir -p $(BENCH_DIR)
	cd models && OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(VPY) -m pipeline.bench --bundle $(abspath $(BUNDLE)) --out $(BENCH_DIR) $(if $(QUICK),--quick)
	$(CARGO) bench -p sglora-cli --bench bench -- --bundle $(abspath $(BUNDLE)) --fp32-bundle $(BENCH_DIR)/fp32-bundle --python $(BENCH_DIR)/python.json --json $(BENCH_DIR)/rust.json $(if $(QUICK),--quick)
	cat benches/notes.md >> BENCHMARKS.md

soak:
	SGLORA_SOAK_CLIENTS=32 SGLORA_SOAK_SECS=60 SGLORA_SOAK_JSON=$(abspath $(TARGET_DIR))/soak.json \
	  $(CARGO) test -p sglora-cli --test soak -- --nocapture
	SGLORA_CRASH_CYCLES=100 SGLORA_CRASH_JSON=$(abspath $(TARGET_DIR))/crash.json \
	  $(CARGO) test -p sglora-cli --test crash -- --nocapture

FUZZ_CASES ?= 4000
FUZZ_SECONDS ?= 900
fuzz:
	PROPTEST_CASES=$(FUZZ_CASES) timeout $(FUZZ_SECONDS) $(CARGO) test -p sglora-cli --test fuzz -- --nocapture

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
	install -Dm644 dbus/org.sglora.Generator1.xml $(DESTDIR)$(DBUSDIR)/interfaces/org.sglora.Generator1.xml
	install -Dm644 dbus/org.sglora.Admin1.xml $(DESTDIR)$(DBUSDIR)/interfaces/org.sglora.Admin1.xml
	install -Dm644 sglorad.toml.example $(DESTDIR)$(DOCDIR)/sglorad.toml.example
	install -Dm644 README.md $(DESTDIR)$(DOCDIR)/README.md
	test -e $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml || install -Dm644 sglorad.toml.example $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/sglora $(DESTDIR)$(UNITDIR)/sglorad.service
	rm -rf $(DESTDIR)$(LIBDIR)/sglora $(DESTDIR)$(DOCDIR)
	rm -f $(DESTDIR)$(DBUSDIR)/system.d/org.sglora.Generator1.conf $(DESTDIR)$(DBUSDIR)/system-services/org.sglora.Generator1.service
	rm -f $(DESTDIR)$(LIBDIR)/sysusers.d/sglora.conf
	rm -f $(DESTDIR)$(DBUSDIR)/interfaces/org.sglora.Generator1.xml $(DESTDIR)$(DBUSDIR)/interfaces/org.sglora.Admin1.xml
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/sglora/sglorad.toml and /var/lib/sglora, /var/cache/sglora (remove by hand)"

# --- Debian packages (packaging/) ------------------------------------------------------------
# make deb ARCH=amd64|arm64|armhf: target/deb/sglora_VERSION_ARCH.deb from the static x86-64 or
# aarch64 binary (musl; armhf: the static glibc armv7 one).
ARCH ?= amd64
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
DEB_BIN_amd64 := $(TARGET_DIR)/x86_64-unknown-linux-musl/board/sglora
DEB_BIN_arm64 := $(TARGET_DIR)/aarch64-unknown-linux-musl/board/sglora
DEB_BIN_armhf := $(TARGET_DIR)/armv7-unknown-linux-gnueabihf/board/sglora
deb: deps-deb
	@case "$(ARCH)" in amd64) $(MAKE) x86_64-static ;; arm64) $(MAKE) aarch64 ;; armhf) $(MAKE) armv7 ;; \
	  *) echo "ARCH must be amd64, arm64 or armhf" >&2; exit 2 ;; esac
	packaging/mkdeb $(ARCH) $(DEB_BIN_$(ARCH)) $(TARGET_DIR)/deb
	lintian --fail-on error,warning $(TARGET_DIR)/deb/sglora_$(VERSION)-1_$(ARCH).deb

deps-deb:
	@command -v lintian >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q lintian)

# Installs the amd64 package on this machine (root), checks, runs and purges it.
test-deb: deb
	tests/deb_check.sh $(TARGET_DIR)/deb/sglora_$(VERSION)-1_amd64.deb

# --- ARM boards (cross/README.md) ------------------------------------------------------------
# Statically linked (musl), stripped: no dynamic loader, no glibc, any Linux of the architecture.
aarch64: deps-static
	$(ZIG) zigbuild --profile board --target aarch64-unknown-linux-musl --bin sglora
	cross/check-static $(TARGET_DIR)/aarch64-unknown-linux-musl/board/sglora

x86_64-static: deps-static
	$(ZIG) zigbuild --profile board --target x86_64-unknown-linux-musl --bin sglora
	cross/check-static $(TARGET_DIR)/x86_64-unknown-linux-musl/board/sglora

# armv7 is statically linked against glibc (Debian's armhf cross toolchain, `+crt-static` in
# .cargo/config.toml): rustup here cannot download armv7-unknown-linux-musleabihf's standard
# library (cross/README.md). No loader, no NEEDED entries: any armv7 Linux runs it.
armv7: deps-cross
	$(CARGO) build --profile board --target armv7-unknown-linux-gnueabihf --bin sglora
	cross/check-static $(TARGET_DIR)/armv7-unknown-linux-gnueabihf/board/sglora

# The test executables a `cargo test --no-run --message-format=json` built, one per line.
EXECUTABLES := sed -n 's/.*"executable":"\([^"]*\)".*/\1/p'

# The libraries' unit tests (core and daemon) and the parity tests on the real bundle (Rust vs
# the Python golden fixtures), run under qemu-aarch64 (cortex-a72) through the runner in
# .cargo/config.toml. One cargo call over the whole workspace: selecting packages separately
# would resolve other dependency features and build tract twice.
CROSS_TESTS := --workspace --lib --test parity
test-aarch64: deps-static
	$(ZIG) test --target aarch64-unknown-linux-musl $(CROSS_TESTS) --no-run --message-format=json \
	  | $(EXECUTABLES) | xargs cross/check-static
	$(ZIG) test --target aarch64-unknown-linux-musl $(CROSS_TESTS)
	# The Cortex-A72 has no dot-product extension; the kernels' tests once more on qemu's "max"
	# CPU, which has it, so the sdot path is checked against the reference too (same build).
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER="env SGLORA_EMULATED=qemu-aarch64 qemu-aarch64 -cpu max" \
	  $(ZIG) test --target aarch64-unknown-linux-musl --workspace --lib -- kernels::

# The same under qemu-arm (Cortex-A15) with no sysroot: the armv7 binaries are static (glibc),
# so a dynamic one could not start. armv7 runs the integer kernels' scalar path, and the digest
# test proves its adapters are x86-64's bytes. The runtime comparison (tract and the int8
# runtime's software FMA, minutes under qemu) is skipped there.
test-armv7: deps-cross
	$(CARGO) test --target armv7-unknown-linux-gnueabihf $(CROSS_TESTS) --no-run --message-format=json \
	  | $(EXECUTABLES) | xargs cross/check-static
	$(CARGO) test --target armv7-unknown-linux-gnueabihf $(CROSS_TESTS) -- \
	  --skip the_other_runtimes_agree_with_the_integer_runtime

# systemd-analyze verify and the offline security score of the unit, against the debug binary.
verify-units: test-build
	rm -rf $(TARGET_DIR)/units && mkdir -p $(TARGET_DIR)/units
	sed 's#@BINDIR@#$(abspath $(TARGET_DIR))/debug#g' systemd/sglorad.service > $(TARGET_DIR)/units/sglorad.service
	cd $(TARGET_DIR)/units && systemd-analyze verify ./sglorad.service
	cd $(TARGET_DIR)/units && systemd-analyze security --offline=true --threshold=20 ./sglorad.service | tail -1

clean:
	$(CARGO) clean
	rm -rf models/work/tiny
