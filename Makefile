# zero2merged: make install | test | test-oldest | test-fast | fuzz | lint | format | demo | bench | bench-large | clean
PYTHON ?= python3

.PHONY: install test test-oldest test-fast fuzz lint format demo bench bench-large clean

# torch first, pinned to the CPU build: an unpinned torch (asked for by deepspeed or peft) would pull a
# multi-GB CUDA build on a machine that has none.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[dev]'

# Everything: the lint and format checks, then the tests, the slow ones that train and convert real
# DeepSpeed checkpoints included. Two test processes: most of a test's time is process start-up, pickles and
# file I/O rather than arithmetic (on 2 cores, two took the suite from 572 s to 400 s); each fixture is still
# trained once, by whichever process asks first, the other waiting on its lock.
test: install lint
	$(PYTHON) -m pytest -n 2 --dist worksteal

# The oldest supported stack (constraints-oldest.txt: torch 2.6.0, transformers 4.56.2, PEFT 0.17.1, DeepSpeed
# 0.17.6, ...) in a venv of its own, zero2merged installed into it with --no-deps as into a training job's
# environment; made again when the pins change. Then: the fast suite there; the Trainer callback and
# export_engine inside a training job of that stack; and checkpoints trained by each stack converted by both,
# each judged against DeepSpeed's consolidation + PEFT's merge in the stack that trained it (-m oldest).
OLDEST := build/oldest
OLDEST_PYTHON := $(OLDEST)/bin/python

$(OLDEST)/made: constraints-oldest.txt
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PYTHON) -m pip install -q -c constraints-oldest.txt torch setuptools wheel
	$(OLDEST_PYTHON) -m pip install -q --no-build-isolation -c constraints-oldest.txt \
		transformers peft accelerate safetensors deepspeed packaging click tqdm pytest
	$(OLDEST_PYTHON) -m pip install -q --no-deps -e .
	$(OLDEST_PYTHON) -m zero2merged env
	touch $@

test-oldest: install $(OLDEST)/made
	$(OLDEST_PYTHON) -m pytest -q -m "not slow"
	ZERO2MERGED_FIXTURES=$(abspath fixtures/.cache/oldest) $(OLDEST_PYTHON) -m pytest -q tests/api/test_integrations.py
	ZERO2MERGED_OLDEST_PYTHON=$(abspath $(OLDEST_PYTHON)) $(PYTHON) -m pytest -q -m oldest

test-fast: install
	$(PYTHON) -m pytest -m "not slow"

# The fuzzer's full set: every mutation family of damaged checkpoints, bases and configs, twelve rounds
# (make test runs a seeded subset). A case alone: python -m tests.fuzzing repro SEED
fuzz: install
	$(PYTHON) -m pytest -m fuzz tests/end_to_end/test_fuzz.py

# Style, then the import layers (the contracts in pyproject.toml: no import loop, none running up a layer).
lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()"

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# Train a tiny LoRA model with DeepSpeed ZeRO-3 on 2 CPU ranks (HF Trainer), convert it, verify parity.
demo: install
	$(PYTHON) -m fixtures build demo --link build/demo/checkpoint
	$(PYTHON) -m zero2merged convert build/demo/checkpoint --output build/demo/merged
	$(PYTHON) -m zero2merged verify build/demo/merged --checkpoint build/demo/checkpoint

# zero2merged vs the manual recipe vs plain file copies, on ~0.4B and ~0.6B-param ZeRO-3 checkpoints
# (trained once and cached: a few minutes); prints the table, writes build/bench.json.
bench: install
	$(PYTHON) -m fixtures.bench

# At a size users run: a 2.4B-param ZeRO-3 bf16 checkpoint (made once, about 2 minutes and 10 GB of disk, then
# cached), cold and warm, beside the manual recipe, DeepSpeed's zero_to_fp32 and plain copies; with verify.
# Cold runs drop the page cache (root). Writes build/bench-large.json.
bench-large: install
	$(PYTHON) -m fixtures.large

clean:
	rm -rf build fixtures/.cache .pytest_cache
