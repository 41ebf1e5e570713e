# Two commands for a newcomer: `make train` and `make test`. Both set up what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data train test test-fast lint format clean

setup: $(STAMP) data

# torch/torchvision are pinned and installed first so pip takes the local wheels, never another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian; without apt the code falls back to torchvision's download into data/.
data:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing dataset-fashion-mnist (Debian)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "warning: could not install dataset-fashion-mnist; torchvision will download it"; \
	fi

# The short default run: 10k Fashion-MNIST images at 64 px, 2 epochs (about 2 minutes on 2 CPU cores).
EXPERIMENT ?= fashion_mnist_lite0
train: setup
	$(PY) -m visiontune.train experiment=$(EXPERIMENT) $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts

format: $(STAMP)
	$(PY) -m ruff format src tests scripts
	$(PY) -m ruff check --fix src tests scripts

# The whole suite, in one pytest-xdist worker per core (tests/conftest.py gives each one thread).
WORKERS ?= auto
test: setup lint
	$(PY) -m pytest -q -n $(WORKERS) $(PYTEST_ARGS)

# The edit loop: every test that neither trains nor runs a command (the `heavy` marker, tests/conftest.py).
test-fast: setup
	$(PY) -m pytest -q -n $(WORKERS) -m "not slow and not heavy" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
