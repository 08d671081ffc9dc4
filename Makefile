# Two commands on a fresh machine: `make serve` and `make test`. Each installs what it
# needs into .venv first (once; again only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: serve test install clean system-deps

serve: $(VENV)/.installed
	@./scripts/system-deps media
	$(BIN)/sdrctl serve

test: $(VENV)/.installed-dev system-deps
	$(BIN)/python -m pytest

install: $(VENV)/.installed

# Debian packages (chromium, ffmpeg, tesseract-ocr-por): installed when missing and we
# are root with apt-get; otherwise the script says what to install.
system-deps:
	@./scripts/system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@ $(VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache
