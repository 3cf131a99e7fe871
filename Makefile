# Two commands, each doing its own set-up on a fresh machine:
#   make demo   installs what is missing, then trains with MetaRM on the embedded default
#               (tiny Llama, synthetic preference task and meta set; offline)
#   make test   installs what is missing, then runs the test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo demo-vanilla test

# A torch already present (a GPU user's) is kept; with none, the CPU build is installed
# explicitly, because a bare `torch` requirement would pull a CUDA build of several GB.
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	@$(PIP) install -q -e ".[test]"

demo: install
	$(PYTHON) -m metarm_fast.cli train --method metarm --output-dir runs/demo

demo-vanilla: install
	$(PYTHON) -m metarm_fast.cli train --output-dir runs/demo-vanilla

test: install
	$(PYTHON) -m pytest -q tests
