# The README's commands. `make run` and `make test` each set up everything first:
# a virtual environment in .venv with the pinned set from requirements.lock.
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
# The steps call `python`; DVC runs them through the shell, so the venv goes first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install run test lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $@

# The main job: the whole pipeline on the embedded default data (sklearn's digits), offline.
run: install
	dvc repro

test: install
	pytest

lint: install
	ruff check .

# Re-pin after changing the ranges in pyproject.toml: resolve into a fresh venv, freeze it.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --exclude-editable > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) data/prepared outputs
