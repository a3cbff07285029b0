# stepq: each target wraps one `stepq` command.
# Variables: MODEL OUT DATASET SCHEME QTYPE REVISION REPO_ID DRY_RUN ARTIFACT FORCE (=1 replaces an existing artifact).
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
ARTIFACT ?=
FORCE ?=

.PHONY: setup pull calibrate quant-fp8 quant-nvfp4 quant-gguf eval gate publish bench test fixture inspect clean

setup: $(STAMP)

# torch first, pinned: this machine has a CPU build of 2.13.0 on disk; a looser requirement pulls a CUDA build.
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
	$(STEPQ) calibrate $(MODEL) $(if $(DATASET),--dataset $(DATASET)) --out $(OUT)

quant-fp8: $(STAMP)
	$(STEPQ) quantize $(MODEL) --scheme $(or $(SCHEME),fp8-block) --out $(OUT) $(if $(FORCE),--force)

quant-nvfp4: $(STAMP)
	$(STEPQ) quantize $(MODEL) --scheme $(or $(SCHEME),nvfp4a16) --out $(OUT) $(if $(FORCE),--force)

quant-gguf: $(STAMP)
	$(STEPQ) quantize $(MODEL) --scheme gguf $(if $(QTYPE),--qtype $(QTYPE)) --out $(OUT) $(if $(FORCE),--force)

eval: $(STAMP)
	$(STEPQ) eval $(ARTIFACT) --model $(MODEL)

gate: $(STAMP)
	$(STEPQ) gate $(ARTIFACT)

publish: $(STAMP)
	$(STEPQ) publish $(ARTIFACT) --repo-id $(REPO_ID) $(if $(DRY_RUN),--dry-run)

# Conversion figures (size, time, peak memory, per-role weight error) -> bench/results/convert_fixture.json.
bench: $(STAMP)
	$(BIN)/python bench/convert_fixture.py $(MODEL)

# Re-train the bundled fixture (deterministic given its seed; the result is committed).
fixture: $(STAMP)
	$(BIN)/python fixtures/train_tiny_step35.py --out fixtures/tiny-step35

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(OUT)
