# Two commands on a fresh machine:  `make train` (the seed's digit example) and `make test`.
# Both create .venv and install what they need. torch is pinned to 2.13.0 and installed first:
# a CPU-only machine with a local CPU wheel (pip find-links) takes that, a GPU machine gets the
# CUDA build from PyPI, and no later requirement can pull a second, multi-GB torch.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
ARGS   ?=

TRL_VENV ?= .bench-venv-trl

.PHONY: install train test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0"
	$(BIN)/pip install --disable-pip-version-check -q -e ".[test]"
	touch $@

train: install
	$(BIN)/dapo train $(ARGS)

test: install
	$(BIN)/python -m pytest $(ARGS)

# The benchmarks of benchmarks/README.md; TRL goes into its own virtualenv.
bench: install
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -c "import trl" 2>/dev/null || $(TRL_VENV)/bin/pip install -q -r benchmarks/trl_requirements.txt
	$(BIN)/python benchmarks/digit_time_to_learn.py --trl-python $(TRL_VENV)/bin/python
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
