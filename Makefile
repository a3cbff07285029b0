# stepq: each target wraps one `stepq` command.
# Variables: MODEL OUT DATASET SCHEME QTYPE REVISION REPO_ID DRY_RUN ARTIFACT FORCE (=1 replaces an existing artifact)
# IMATRIX (=1: GGUF K/IQ quants with an importance matrix from stepq's calibration).
# DEVICE (auto, cpu, cuda, cuda:N) and DTYPE (bfloat16, float32): where calibration and eval run their forward.
# EXECUTOR (local, ray) and RAY_ADDRESS (host:port of `ray start --head`; empty: a local Ray): where calibrate and
# quantize run their work (README "Scale out on Ray"; Ray comes with `make setup`, or `pip install -e '.[ray]'`).
# METHOD (rtn, search, gptq, gptq+search): how weights are rounded; quant-nvfp4 defaults to gptq (bench/README.md
# "Quantization methods": the lowest KLD measured), quant-fp8 to rtn.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stepq-installed
STEPQ := $(BIN)/stepq

MODEL ?= fixtures/tiny-step35
OUT ?= out
DATASET ?=
SCHEME ?=
QTYPE ?=
REVISION ?=
REPO_ID ?=
DRY_RUN ?=
POLICY ?=
BASELINE ?=
ARTIFACT ?=
LAST_ARTIFACT = $(shell cat $(OUT)/.last-artifact 2>/dev/null)
TASKS ?=
FORCE ?=
IMATRIX ?=
METHOD ?=
DEVICE ?=
DTYPE ?=
COMPUTE = $(if $(DEVICE),--device $(DEVICE)) $(if $(DTYPE),--dtype $(DTYPE))
EXECUTOR ?=
RAY_ADDRESS ?=
SCALE = $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(and $(filter ray,$(EXECUTOR)),$(RAY_ADDRESS)),--ray-address $(RAY_ADDRESS))

.PHONY: setup pull calibrate quant-fp8 quant-nvfp4 quant-gguf eval gate publish bench test fixture inspect clean

setup: $(STAMP)

# torch first, pinned: `pip install torch==2.13.0` takes the CPU build where one is provided locally; a looser
# requirement pulls a multi-GB CUDA build from the index.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

pull: $(STAMP)
	$(STEPQ) pull $(MODEL) $(if $(REVISION),--revision $(REVISION))

inspect: $(STAMP)
	$(STEPQ) inspect $(MODEL)

calibrate: $(STAMP)
	$(STEPQ) calibrate $(MODEL) $(if $(DATASET),--dataset $(DATASET)) --out $(OUT) $(if $(FORCE),--force) $(COMPUTE) $(SCALE)

quant-fp8: $(STAMP)
	$(STEPQ) quantize $(MODEL) --scheme $(or $(SCHEME),fp8-block) --out $(OUT) $(if $(FORCE),--force) $(if $(DATASET),--dataset $(DATASET)) $(if $(METHOD),--method $(METHOD) $(COMPUTE)) $(SCALE)

quant-nvfp4: $(STAMP)
	$(STEPQ) quantize $(MODEL) --scheme $(or $(SCHEME),nvfp4) --method $(or $(METHOD),gptq) --out $(OUT) $(if $(FORCE),--force) $(if $(DATASET),--dataset $(DATASET)) $(COMPUTE) $(SCALE)

# quant-gguf: QTYPE=Q4_K_M (default); IMATRIX=1 quantizes with stepq's calibration (required by IQ2_XXS, IQ2_XS,
# IQ2_S, IQ2_M, IQ3_XXS, IQ1_S, IQ1_M); NO_MTP=1 drops the MTP head; MTP_ONLY=1 writes only the MTP draft
# (out/<model>-GGUF-<QTYPE>-MTP/mtp-<model>-<QTYPE>.gguf) for llama.cpp's --spec-draft-model beside a NO_MTP=1 trunk.
# Step-3.7: the folder also holds mmproj-<model>-F16.gguf, the vision tower and projector (llama-mtmd-cli --mmproj).
quant-gguf: $(STAMP) llama-cpp
	$(STEPQ) quantize $(MODEL) --scheme gguf $(if $(QTYPE),--qtype $(QTYPE)) --out $(OUT) $(if $(FORCE),--force) $(if $(NO_MTP),--no-mtp) $(if $(MTP_ONLY),--mtp-only) $(if $(IMATRIX),--imatrix $(if $(DATASET),--dataset $(DATASET))) $(SCALE)

# ARTIFACT defaults to the variant the last `make quant-*` wrote (OUT/.last-artifact).
eval: $(STAMP)
	$(STEPQ) eval $(or $(ARTIFACT),$(LAST_ARTIFACT)) --model $(MODEL) --out $(OUT) $(if $(DATASET),--dataset $(DATASET)) $(if $(TASKS),--tasks $(TASKS)) $(if $(FORCE),--force) $(COMPUTE)

# gate: POLICY= a policy YAML (default: eval/policies/, by source model); BASELINE= the last release's report
# (report.json, artifact folder or Hub repo id) for the regression rules. Exit 1 when the gate fails.
gate: $(STAMP)
	$(STEPQ) gate $(or $(ARTIFACT),$(LAST_ARTIFACT)) $(if $(POLICY),--policy $(POLICY)) $(if $(BASELINE),--baseline $(BASELINE))

# publish: REPO_ID=org/name, REVISION= a branch (created if missing), DRY_RUN=1 prints the operations only.
publish: $(STAMP)
	$(STEPQ) publish $(or $(ARTIFACT),$(LAST_ARTIFACT)) $(if $(REPO_ID),--repo-id $(REPO_ID)) $(if $(REVISION),--revision $(REVISION)) $(if $(DRY_RUN),--dry-run)

# Conversion figures (size, time, peak memory, per-role weight error) -> bench/results/convert_fixture.json, then
# speed vs disk and vs compressed-tensors on a real-shaped checkpoint -> bench/results/convert_real_$(BENCH).json.
# BENCH=quick (default, minutes): 1 MoE layer of 32 experts (~3 GB); BENCH=full: 1 MoE layer of 288 experts
# (~13 GB); BENCH_ARGS="--moe-layers 3" for a checkpoint larger than RAM. Generated once into ~/.cache/stepq/bench.
# Then calibration speed and memory on the same checkpoint + the full model's extrapolated calibration time
# -> bench/results/calib_real_$(BENCH).json.
BENCH ?= quick
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python bench/convert_fixture.py $(MODEL)
	$(BIN)/python bench/convert_real.py --size $(BENCH) $(BENCH_ARGS)
	$(BIN)/python bench/calib_real.py --size $(BENCH)

# Re-train the bundled fixture (deterministic given its seed; the result is committed), then rebuild the Step-3.7
# fixture from it (its text stack + a small vision tower).
fixture: $(STAMP)
	$(BIN)/python fixtures/train_tiny_step35.py --out fixtures/tiny-step35
	$(BIN)/python fixtures/make_tiny_step37.py --out fixtures/tiny-step37

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(OUT)

# --- llama.cpp tools (GGUF export and checks) -------------------------------------------------------------------
# Builds the llama.cpp vendored in the llama-cpp-python sdist (CPU only) into a cache outside the repo, keyed by
# version, reused through a stamp. The cache also keeps the tree's gguf-py and converter (convert_hf_to_gguf.py,
# conversion/) that the GGUF tests compare against. 16-22 min on 2 cores the first time, 176 MB; then instant.
# From the same sdist, its pure-Python ctypes package `llama_cpp/` (+ its one missing dependency, diskcache) goes
# to $(LLAMA_CPP_DIR)/python: eval/gguf_logits.py runs it over the libllama.so built here (LLAMA_CPP_LIB_PATH), so
# the binding and the library always come from one sdist and nothing is compiled twice.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_DIR ?= $(HOME)/.cache/stepq/llama.cpp-$(LLAMA_CPP_VERSION)
LLAMA_CPP_TOOLS := llama-quantize llama-perplexity llama-imatrix llama-bench llama-speculative-simple llama-completion llama-gguf-split llama-tokenize \
	llama-mtmd-cli
LLAMA_CPP_STAMP := $(LLAMA_CPP_DIR)/.stepq-built
LLAMA_CPP_PY_STAMP := $(LLAMA_CPP_DIR)/python/.stepq-extracted
LLAMA_CPP_PY_DEPS := diskcache==5.6.3
# Native build without AMX: ggml's AMX matmul (picked for quantized types on CPUs that report AMX) dies with
# SIGILL/SIGSEGV in VMs that report AMX without giving the process tile state. Explicit -mno-* flags win over
# -march=native in GCC. The build id is in the stamp: a cache built with other flags is rebuilt.
LLAMA_CPP_NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_BUILD_ID := llama-cpp-python==$(LLAMA_CPP_VERSION) native $(LLAMA_CPP_NO_AMX)
LLAMA_CPP_PIP = $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip)

.PHONY: llama-cpp
llama-cpp:
	@mkdir -p $(LLAMA_CPP_DIR)
	@flock $(LLAMA_CPP_DIR)/.lock $(MAKE) --no-print-directory llama-cpp-build LLAMA_CPP_DIR=$(LLAMA_CPP_DIR)

# Runs under the lock; a caller that waited for another build finds everything in place and does nothing.
# A tool added to LLAMA_CPP_TOOLS later is built incrementally (seconds) on top of the cached build; a missing
# Python package is fetched again (the sdist is deleted after extraction) without touching the build.
.PHONY: llama-cpp-build
llama-cpp-build:
	@set -euo pipefail; \
	same_build() { grep -qxF "$(LLAMA_CPP_BUILD_ID)" $(LLAMA_CPP_STAMP) 2>/dev/null; }; \
	built() { same_build || return 1; \
	  for t in $(LLAMA_CPP_TOOLS); do test -x $(LLAMA_CPP_DIR)/src/build/bin/$$t || return 1; done; }; \
	if built && [ -f $(LLAMA_CPP_PY_STAMP) ]; then \
	  echo "llama.cpp $(LLAMA_CPP_VERSION): tools in $(LLAMA_CPP_DIR)/src/build/bin (cached)"; exit 0; fi; \
	sdist=$(LLAMA_CPP_DIR)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz; \
	if [ ! -f $(LLAMA_CPP_DIR)/src/CMakeLists.txt ] || [ ! -f $(LLAMA_CPP_PY_STAMP) ]; then \
	  rm -rf $(LLAMA_CPP_DIR)/sdist; mkdir -p $(LLAMA_CPP_DIR)/sdist; \
	  $(LLAMA_CPP_PIP) download -q --no-binary :all: --no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_CPP_DIR)/sdist; \
	fi; \
	if [ ! -f $(LLAMA_CPP_DIR)/src/CMakeLists.txt ]; then \
	  rm -rf $(LLAMA_CPP_DIR)/src.tmp; mkdir -p $(LLAMA_CPP_DIR)/src.tmp; \
	  tar xzf $$sdist -C $(LLAMA_CPP_DIR)/src.tmp --strip-components=3 llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp; \
	  mv $(LLAMA_CPP_DIR)/src.tmp $(LLAMA_CPP_DIR)/src; \
	fi; \
	if [ ! -f $(LLAMA_CPP_PY_STAMP) ]; then \
	  rm -rf $(LLAMA_CPP_DIR)/python $(LLAMA_CPP_DIR)/python.tmp; mkdir -p $(LLAMA_CPP_DIR)/python.tmp; \
	  tar xzf $$sdist -C $(LLAMA_CPP_DIR)/python.tmp --strip-components=1 llama_cpp_python-$(LLAMA_CPP_VERSION)/llama_cpp; \
	  grep -qx '__version__ = "$(LLAMA_CPP_VERSION)"' $(LLAMA_CPP_DIR)/python.tmp/llama_cpp/__init__.py; \
	  $(LLAMA_CPP_PIP) install -q --no-deps --target $(LLAMA_CPP_DIR)/python.tmp $(LLAMA_CPP_PY_DEPS); \
	  echo "llama-cpp-python==$(LLAMA_CPP_VERSION) $(LLAMA_CPP_PY_DEPS)" > $(LLAMA_CPP_DIR)/python.tmp/.stepq-extracted; \
	  mv $(LLAMA_CPP_DIR)/python.tmp $(LLAMA_CPP_DIR)/python; \
	fi; \
	rm -rf $(LLAMA_CPP_DIR)/sdist; \
	if ! built; then \
	  if [ -f $(LLAMA_CPP_STAMP) ] && ! same_build; then rm -rf $(LLAMA_CPP_DIR)/src/build $(LLAMA_CPP_STAMP); fi; \
	  cmake -S $(LLAMA_CPP_DIR)/src -B $(LLAMA_CPP_DIR)/src/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
	    -DCMAKE_C_FLAGS="$(LLAMA_CPP_NO_AMX)" -DCMAKE_CXX_FLAGS="$(LLAMA_CPP_NO_AMX)" \
	    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
	    -DLLAMA_BUILD_UI=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF > $(LLAMA_CPP_DIR)/configure.log; \
	  cmake --build $(LLAMA_CPP_DIR)/src/build -j2 --target $(LLAMA_CPP_TOOLS); \
	  for t in $(LLAMA_CPP_TOOLS); do test -x $(LLAMA_CPP_DIR)/src/build/bin/$$t; done; \
	  { echo "$(LLAMA_CPP_BUILD_ID)"; echo "built $$(date -u +%FT%TZ)"; } > $(LLAMA_CPP_STAMP); \
	fi; \
	echo "llama.cpp tools in $(LLAMA_CPP_DIR)/src/build/bin, Python binding in $(LLAMA_CPP_DIR)/python"

# vLLM conformance env (eval/vllm_conformance.py): vLLM's own loader, in a separate venv outside the repo, cached
# by version (vLLM pins transformers/compressed-tensors differently from the project). Only what vLLM imports to
# build Step-3.5 and load weights on CPU: torch pinned first (the CPU build; a looser pin pulls CUDA torch), the
# vLLM wheel and compressed-tensors without their dependency trees (CUDA kernels never imported here), xgrammar
# without triton, then the pure-Python imports. pip warns that vllm wants torch 2.14.0: not needed on this path.
VLLM_VERSION := 0.33.0
VLLM_ENV ?= $(HOME)/.cache/stepq/vllm-$(VLLM_VERSION)
VLLM_STAMP := $(VLLM_ENV)/.stepq-vllm-env
VLLM_NODEPS := vllm==$(VLLM_VERSION) compressed-tensors==0.17.0 xgrammar==0.2.8
VLLM_DEPS := transformers==5.17.0 apache-tvm-ffi==0.1.11 regex==2026.11.15 cachetools==8.0.1 psutil==7.2.2 \
	py-cpuinfo==9.0.0 msgspec==0.22.0 pydantic==2.14.3 cloudpickle==3.1.2 einops==0.8.2 pyzmq==27.3.0 \
	urllib3==2.8.0 cbor2==6.3.0 aiohttp==3.14.5 requests==2.34.2 openai-harmony==0.0.8 openai==3.54.0 \
	pillow==13.0.0 pybase64==1.5.1 uvloop==0.23.0 prometheus-client==0.26.0 fastapi==0.136.3 \
	partial-json-parser==0.2.1.1.post7 llguidance==1.7.6 loguru==0.7.3

.PHONY: vllm-env
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	mkdir -p $(VLLM_ENV)
	flock $(VLLM_ENV)/.lock $(MAKE) --no-print-directory vllm-env-build VLLM_ENV=$(VLLM_ENV)

# Runs under the lock; a second caller that waited finds the stamp and does nothing.
.PHONY: vllm-env-build
vllm-env-build:
	@if [ -f $(VLLM_STAMP) ]; then echo "vLLM $(VLLM_VERSION) env ready in $(VLLM_ENV)"; exit 0; fi; \
	set -euo pipefail; \
	test -x $(VLLM_ENV)/bin/python || $(PYTHON) -m venv $(VLLM_ENV); \
	$(VLLM_ENV)/bin/pip install -q torch==2.13.0; \
	$(VLLM_ENV)/bin/pip install -q --no-deps --no-warn-conflicts $(VLLM_NODEPS); \
	$(VLLM_ENV)/bin/pip install -q --no-warn-conflicts torch==2.13.0 $(VLLM_DEPS); \
	VLLM_TARGET_DEVICE=cpu $(VLLM_ENV)/bin/python -c \
	  "import vllm.config, vllm.model_executor.model_loader, vllm.model_executor.models.step3p5_mtp"; \
	echo "torch==2.13.0 $(VLLM_NODEPS) $(VLLM_DEPS)" > $(VLLM_STAMP); \
	echo "vLLM $(VLLM_VERSION) env in $(VLLM_ENV)"
