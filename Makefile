# The two commands of the README: `make repro` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Stage commands (stages/run) and tests find the project's interpreter first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro retrain test check lint bench server team-server experiment screenshots clean

# versions.yaml: the installed versions that decide results, an input of the stages that depend on them
setup: $(STAMP)
	@$(BIN)/python -m stages.commands.versions

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,team]'
	@touch $@

repro: setup
	$(BIN)/dvc repro

# dvc repro only if params, code or data changed since dvc.lock; summary of the promotion decision (README)
retrain: setup
	$(BIN)/python -m stages.commands.retrain

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/actionlint .github/workflows/*.yml
	$(BIN)/check-jsonschema --builtin-schema vendor.renovate .github/renovate.json

# one worker per core, each test module on one worker (module fixtures, servers per worker)
test: lint
	$(BIN)/pytest -n auto --dist loadfile

# lint and the fast tests (no real dvc repro, servers or fresh training processes); CI runs `make test`
check: lint
	$(BIN)/pytest -m "not slow"

# the benchmarks read the pipeline's outputs (data/prepared, models): repro first, a no-op when up to date
bench: repro
	$(BIN)/python -m benchmarks

# MLflow tracking server for the repository's store, on the loopback interface only
MLFLOW_PORT ?= 5000
server: setup
	$(BIN)/mlflow server --backend-store-uri sqlite:///$(abspath mlflow.db) \
		--artifacts-destination $(abspath mlartifacts) --host 127.0.0.1 --port $(MLFLOW_PORT)

# The team's tracking server: PostgreSQL backend, artifact store, basic auth (configured by environment
# variables: docs/team.md)
team-server: setup
	$(BIN)/python -m stages.commands.server

# One machine's experiment: pull, dvc exp run, dvc exp push (docs/team.md), e.g.
#   make experiment NAME=ridge-10 SET="-S baselines.ridge.alpha=10.0"
experiment: setup
	$(BIN)/python -m stages.commands.experiment --name "$(NAME)" $(SET)

# The MLflow UI pictures of docs/mlflow.md: two tiny pipeline runs on a fresh server, shown in headless
# Chromium by the UI test's own set-up (tests/support/ui.py); writes docs/images/mlflow-*.png
screenshots: setup
	$(BIN)/python -m tests.support.ui docs/images

clean:
	rm -rf $(VENV)
