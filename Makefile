# Two commands a newcomer needs (see README): `make repro` and `make test`.
# `make exp PROFILE=paper ARGS="--name paper"`: a profile of params overrides as a DVC experiment.
# `make review BASE=main`: review/review.md, the change from BASE to the workspace (HEAD=<rev>: to a commit), as
# CI posts it on a pull request (docs/review.md).
VENV ?= .venv
PYTHON ?= python3
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup repro test exp review
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

repro: setup
	dvc repro

# ruff's lint and format check (seconds) and mypy's type check of deeper/ (minutes with an empty .mypy_cache,
# then under one) first, config in pyproject.toml: a finding fails the run before the tests start (`ruff format .`
# fixes the formatting)
test: setup
	ruff check .
	ruff format --check .
	mypy
	pytest

PROFILE ?= paper
exp: setup
	python -m stages.profile $(PROFILE) --run $(ARGS)

# The review compares committed revisions and the workspace; run `dvc repro` first so the workspace's metrics
# are those of its params (the report warns where dvc.lock and params.yaml disagree).
BASE ?= main
review: setup
	python -m stages.review --base $(BASE) $(if $(HEAD),--head $(HEAD)) --out review
