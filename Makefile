# The two commands of the README: `make demo` and `make test`.
# Each creates (or reuses) .venv by itself.
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON_FOR_VENV ?= $(shell command -v python3.11 || command -v python3)

export DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90

.PHONY: demo test lint venv
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON_FOR_VENV) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	$(BIN)/gaussian-ad demo demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

# Test files in parallel, one worker per core (at most 4); a file's tests share a worker, so
# each module's fixtures run once.
test: lint
	$(BIN)/pytest -n auto --maxprocesses 4 --dist loadfile
