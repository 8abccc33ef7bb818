# Every target does its own set-up: a virtual env in .venv, the project and its packages, and the
# system libraries it needs (libopus through apt-get when missing and we are root).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.legato-installed

.PHONY: setup test test-fast demo bench lint relink clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/system-deps.sh
	bash scripts/system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77" wheel
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=strict
	touch $(STAMP)

# Rebuild the strict editable link tree: a new module is invisible until this runs.
relink: $(STAMP)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict

test: relink
	bash scripts/system-deps.sh test
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: relink
	$(PY) -m pytest -q -m "not e2e" -p no:cacheprovider

demo: relink
	$(PY) -m legato.sandbox demo

bench: relink
	bash scripts/system-deps.sh bench
	$(PY) -m pip install -q 'discord.py==2.7.1' davey psutil
	$(PY) bench/run.py

lint: relink
	$(VENV)/bin/ruff check plugin cogs audio tests bench examples
	$(VENV)/bin/ruff format --check plugin cogs audio tests bench examples
	$(VENV)/bin/mypy -p legato
	$(VENV)/bin/mypy tests

clean:
	rm -rf $(VENV) build *.egg-info out
