# Two commands a newcomer needs (see README): `make repro` and `make test`.
# `make exp PROFILE=paper ARGS="--name paper"`: a profile of params overrides as a DVC experiment.
VENV ?= .venv
PYTHON ?= python3
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test exp
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

repro: setup
	dvc repro

test: setup
	pytest

PROFILE ?= paper
exp: setup
	python -m stages.profile $(PROFILE) --run $(ARGS)
