# Every install step the project needs lives here. CI runs `bash .ci/run` = `make test`.
SHELL := /bin/bash
PYTHON ?= python3
ASSETS := .cache/assets
TOKENIZER_MODEL := $(ASSETS)/tokenizer.model.v1
MISTRAL_COMMON := mistral-common==1.13.1

.PHONY: all build test lint test-cpu assets fixtures demo bench clean-assets cuda-toolkit build-cuda check-cuda browser-deps browser-test launch-counter

all: build

build:
	cargo build --release

# Mistral's SentencePiece tokenizer.model (the one LLaVA-Med ships) comes from the PyPI package
# mistral-common; we download the wheel and extract only that file.
assets: $(TOKENIZER_MODEL)

$(TOKENIZER_MODEL):
	mkdir -p $(ASSETS) .cache/wheels
	$(PYTHON) -m pip download --no-deps --only-binary=:all: -d .cache/wheels $(MISTRAL_COMMON)
	$(PYTHON) -c "import zipfile,glob,shutil; w=sorted(glob.glob('.cache/wheels/mistral_common-*.whl'))[-1]; z=zipfile.ZipFile(w); shutil.copyfileobj(z.open('mistral_common/data/tokenizer.model.v1'), open('$(TOKENIZER_MODEL).tmp','wb'))"
	mv $(TOKENIZER_MODEL).tmp $(TOKENIZER_MODEL)

# The test command (README, .ci/run): formatting and clippy, the CPU test suite, the page of
# `prs serve` in headless Chromium, then a full compile of the CUDA build (no GPU needed) so
# that `cfg(feature = "cuda")` code cannot rot.
test: lint test-cpu browser-test check-cuda

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-cpu: assets
	PRS_TOKENIZER_MODEL=$(CURDIR)/$(TOKENIZER_MODEL) cargo test --no-fail-fast

# Debian's Chromium (as root, or through sudo) and playwright-core (npm, pinned by
# tests/browser/package-lock.json) for the browser check.
browser-deps:
	command -v chromium >/dev/null || { $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -qq --no-install-recommends chromium; }
	test -d tests/browser/node_modules/playwright-core || npm ci --prefix tests/browser --no-audit --no-fund

# prs serve's page in a real browser: upload, overlay, answer, history, phone width (screenshots
# in runs/browser).
browser-test: assets browser-deps
	# The test profile: after `make test-cpu` this binary exists already (no second build).
	cargo build --profile test --bin prs
	PRS_TOKENIZER_MODEL=$(CURDIR)/$(TOKENIZER_MODEL) bash scripts/browser_check.sh

# The main job on the embedded default: tiny PRS-Med + synthetic data, init -> finetune ->
# evaluate -> predict, on the CPU. Output in runs/demo (curves.png, eval/summary.md, predict/).
DEMO_DIR ?= runs/demo
demo: assets
	cargo build --release
	rm -rf $(DEMO_DIR)
	PRS_TOKENIZER_MODEL=$(CURDIR)/$(TOKENIZER_MODEL) ./target/release/prs demo --out $(DEMO_DIR)

# Numbers, never pass/fail: tiny-model training (samples/s and peak RSS per batch size x
# accumulation x checkpointing, measured in child processes), inference latency, and prs serve
# under 8 concurrent clients (p50/p95 latency, throughput, with and without batching).
bench: assets
	cargo build --release --examples
	./target/release/prs profile-memory --config configs/tiny.toml --device cpu --batch-sizes 2,4,8 \
		--precision f32 --checkpointing both --effective-batch 8 --measure
	PRS_TOKENIZER_MODEL=$(CURDIR)/$(TOKENIZER_MODEL) ./target/release/examples/bench_infer
	PRS_TOKENIZER_MODEL=$(CURDIR)/$(TOKENIZER_MODEL) ./target/release/examples/bench_serve

# Regenerates the PyTorch parity fixtures under tests/fixtures (needs torch; CPU only).
# Not part of `make test`: the fixtures are committed.
FIXTURE_VENV := .venv
fixtures:
	test -x $(FIXTURE_VENV)/bin/python || $(PYTHON) -m venv $(FIXTURE_VENV)
	$(FIXTURE_VENV)/bin/pip install -q torch==2.5.1 transformers==4.44.2 safetensors numpy sentencepiece protobuf timm mobilesam-mirror $(MISTRAL_COMMON)
	for s in scripts/fixtures/gen_*.py; do echo "== $$s"; $(FIXTURE_VENV)/bin/python $$s || exit 1; done

clean-assets:
	rm -rf .cache

# ---- CUDA (feature `cuda`; docs/cuda.md). Building needs nvcc and the CUDA libraries, not a GPU.
# `cuda-toolkit` uses a system CUDA when nvcc is found (CUDA_HOME or PATH); otherwise it installs
# NVIDIA's CUDA 13.0.2 pip wheels into $(CUDA_PREFIX) and writes $(CUDA_PREFIX)/env.sh, which the
# build targets source. CUDA builds use their own target directory so the CPU one stays valid.
CUDA_PREFIX ?= .cache/cuda
CUDA_COMPUTE_CAP ?= 90
CUDA_TARGET_DIR ?= target/cuda
CUDAFORGE_THREADS ?= $(shell nproc)
CUDA_ENV = if [ -f $(CUDA_PREFIX)/env.sh ]; then . $(CUDA_PREFIX)/env.sh; fi; \
	export CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) CUDAFORGE_THREADS=$(CUDAFORGE_THREADS) \
	CARGO_TARGET_DIR=$(CUDA_TARGET_DIR);

cuda-toolkit:
	@if [ -z "$(CUDA_FROM_PIP)" ] && { [ -x "$$CUDA_HOME/bin/nvcc" ] || command -v nvcc >/dev/null; }; then \
		echo "system CUDA: $$( { [ -x "$$CUDA_HOME/bin/nvcc" ] && echo $$CUDA_HOME/bin/nvcc; } || command -v nvcc) (CUDA_FROM_PIP=1 forces the pip toolkit)"; \
		ldconfig -p 2>/dev/null | grep -q 'libnccl\.so ' || NCCL_ONLY=1 bash scripts/cuda_toolkit.sh $(CUDA_PREFIX); \
	else \
		bash scripts/cuda_toolkit.sh $(CUDA_PREFIX); \
	fi

# CUDA_FEATURES=cuda,nccl builds multi-GPU training too (needs libnccl at run time; README).
CUDA_FEATURES ?= cuda
build-cuda:
	$(CUDA_ENV) cargo build --release --features $(CUDA_FEATURES)

# The driver/cuBLAS call counter `prs bench` reads when it is preloaded (scripts/launch_counter.c):
#   LD_PRELOAD=target/launch_counter/libprs_launch_counter.so prs bench train ... --device cuda
LAUNCH_COUNTER := target/launch_counter/libprs_launch_counter.so
launch-counter: $(LAUNCH_COUNTER)
$(LAUNCH_COUNTER): scripts/launch_counter.c
	mkdir -p $(dir $@)
	cc -shared -fPIC -O2 -Wall -o $@ $< -ldl

# Full (debug-profile) build of every `cfg(feature = "cuda")` and `cfg(feature = "nccl")` path,
# the GPU check example included: compiles the kernels to PTX and links against the CUDA
# libraries and NCCL.
check-cuda: cuda-toolkit
	$(CUDA_ENV) cargo build --features cuda,nccl --lib --bins --examples
