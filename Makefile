# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create ./.venv and install into it. torch is installed first, pinned to a CPU build where
# one is available, so that resolving the project's `torch>=2.2` never pulls a multi-GB CUDA build
# onto a machine without CUDA. Override with `make TORCH=torch==2.5.1 ...` or TORCH= to skip.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench gpu clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH)" ]; then $(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch; fi
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m lifelong_peer.kernels || echo "native PEER kernels unavailable: the pure-PyTorch path will be used"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lpeer demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/peer_layer.py

# faiss-gpu and faiss-cpu both install a `faiss` module: swap them.
gpu: $(STAMP)
	$(PY) -m pip install -q -e ".[gpu,dev]" && $(PY) -m pip uninstall -y faiss-cpu

clean:
	rm -rf $(VENV) build *.egg-info
