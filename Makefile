# Commands, each doing its own set-up on a fresh machine:
#   make demo   installs what is missing, then trains with MetaRM on the embedded default
#               (tiny Llama, synthetic preference task and meta set; offline)
#   make test   installs what is missing, then runs the test suite
#   make test-fast   the same without the tests marked slow (processes started: CLI, torchrun) or bench
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install demo demo-vanilla test test-fast

# A torch already present (a GPU user's) is kept; with none, torch 2.13.0 is installed first, from
# TORCH_INDEX when it is set (on Linux, PyPI's wheel is the CUDA build; for the CPU-only one:
# make test TORCH_INDEX=https://download.pytorch.org/whl/cpu).
# constraints.txt holds the tested versions; a pin applies only to a package not installed yet.
TORCH_INDEX ?=
install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	@$(PYTHON) -c "$$MISSING_PINS" > .missing-constraints.txt
	@$(PIP) install -q -c .missing-constraints.txt -e ".[test]"

define MISSING_PINS
import importlib.metadata as md
def installed(name):
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False
for line in open("constraints.txt"):
    pin = line.split("#")[0].strip()
    if pin and not installed(pin.split("==")[0]):
        print(pin)
endef
export MISSING_PINS

demo: install
	$(PYTHON) -m metarm_fast.cli train --method metarm --output-dir runs/demo --overwrite

demo-vanilla: install
	$(PYTHON) -m metarm_fast.cli train --output-dir runs/demo-vanilla --overwrite

test: install
	$(PYTHON) -m pytest -q tests

test-fast: install
	$(PYTHON) -m pytest -q tests -m "not slow and not bench"
