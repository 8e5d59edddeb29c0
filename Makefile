# make install : create .venv once (re-runs only when pyproject.toml changes)
# make train   : install, then python train.py (pass overrides with ARGS="loss=tversky ...")
# make test    : install, then the test suite (slow tests excluded; make test-all runs them too)
VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.medtrust-installed
# torch/torchvision pinned to the releases on this machine's disk; override on other machines,
# e.g. make install TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TEST_ENV  := HF_HUB_OFFLINE=1 WANDB_MODE=offline
ARGS      ?=
PYTEST_ARGS ?=
# both cores: one pytest worker each (a test file stays on one worker, so its module fixtures are built once)
PYTEST_WORKERS ?= -n 2 --dist loadfile

.PHONY: install train test test-all benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-all: install
	$(TEST_ENV) $(PY) -m pytest -m "" $(PYTEST_WORKERS) $(PYTEST_ARGS)

benchmark: install
	$(PY) experiments/benchmark.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
