# Two commands for a newcomer: `make train` and `make test`. Both set up what they need first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: help setup data browser train test test-fast lint format clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  variables: EXPERIMENT=<name> ARGS='key=value ...' (train), WORKERS=<n> PYTEST_ARGS='...' (test)"

setup: $(STAMP) data browser ## the venv (.venv: torch, the package, dev tools), Fashion-MNIST, chromium

# torch/torchvision are pinned and installed first so pip takes the local wheels, never another torch.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Real Fashion-MNIST from Debian; without apt the code falls back to torchvision's download into data/.
data: ## Fashion-MNIST from Debian's dataset-fashion-mnist, where apt is available
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing dataset-fashion-mnist (Debian)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
		|| echo "warning: could not install dataset-fashion-mnist; torchvision will download it"; \
	fi

# Debian's chromium, for the browser test of serve's try-it page (tests/test_serve_page.py, marker `browser`);
# without apt (or chromium) that test is skipped with its reason.
browser: ## Debian's chromium for the browser test, where apt is available
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian) for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

# The short default run: 10k Fashion-MNIST images at 64 px, 2 epochs (about 2 minutes on 2 CPU cores).
EXPERIMENT ?= fashion_mnist_lite0
train: setup ## the default run (EXPERIMENT=fashion_mnist_lite0; ARGS='trainer.max_epochs=3' to change it)
	$(PY) -m visiontune.train experiment=$(EXPERIMENT) $(ARGS)

lint: $(STAMP) ## ruff check and ruff format --check
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts

format: $(STAMP) ## ruff format and ruff check --fix
	$(PY) -m ruff format src tests scripts
	$(PY) -m ruff check --fix src tests scripts

# The whole suite, in one pytest-xdist worker per core (tests/conftest.py gives each one thread).
WORKERS ?= auto
test: setup lint ## lint, then the whole suite (about 6 minutes on 2 cores); skips are listed with their reason
	$(PY) -m pytest -q -rs -n $(WORKERS) $(PYTEST_ARGS)

# The edit loop: every test that neither trains nor runs a command (the `heavy` marker, tests/conftest.py).
test-fast: setup ## the tests that neither train nor run a command (seconds)
	$(PY) -m pytest -q -n $(WORKERS) -m "not slow and not heavy" $(PYTEST_ARGS)

clean: ## remove the venv, outputs/, multirun/ and the caches
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
