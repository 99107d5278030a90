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

# The local stack, on loopback: a Prefect server (UI at http://127.0.0.1:4200), an MLflow server
# (UI at http://127.0.0.1:5000) and a process worker on pool `local`, each a background process
# with its pid and log under .stack/. `make deploy` registers prefect.yaml's deployments (a worker
# runs the committed code: commit first), `make pipeline` runs the digits one and follows it.
.PHONY: stack-up deploy pipeline stack-down
STACK := .stack
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
STACK_ENV = PREFECT_HOME=$(abspath $(STACK))/prefect \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api \
	MLFLOW_TRACKING_URI=http://127.0.0.1:$(MLFLOW_PORT) PREFECT_SERVER_ANALYTICS_ENABLED=false
# $(call start,NAME,COMMAND,HEALTH URL): start COMMAND unless its pid is alive, wait for the URL.
define start
	@if [ -f $(STACK)/$(1).pid ] && kill -0 $$(cat $(STACK)/$(1).pid) 2>/dev/null; then \
		echo "$(1) already running (pid $$(cat $(STACK)/$(1).pid))"; \
	else \
		$(STACK_ENV) setsid $(2) > $(STACK)/$(1).log 2>&1 & echo $$! > $(STACK)/$(1).pid; \
		echo "started $(1) (pid $$(cat $(STACK)/$(1).pid), log $(STACK)/$(1).log)"; \
	fi
	@for i in $$(seq 180); do curl -sf $(3) > /dev/null && exit 0; \
		kill -0 $$(cat $(STACK)/$(1).pid) 2>/dev/null || { tail -20 $(STACK)/$(1).log; exit 1; }; \
		sleep 1; done; echo "$(1) did not answer at $(3)"; exit 1
endef

# The servers' databases: SQLite files under .stack unless the environment names others, e.g.
# PostgreSQL: MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow and
# PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect.
# Both servers read them from the environment: no password on a command line.
stack-up: export MLFLOW_BACKEND_STORE_URI ?= sqlite:///$(abspath $(STACK))/mlflow.db
stack-up: install
	mkdir -p $(STACK)/workspace $(STACK)/prefect
	$(call start,prefect-server,$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT),http://127.0.0.1:$(PREFECT_PORT)/api/health)
	$(call start,mlflow,$(BIN)/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1 --artifacts-destination $(abspath $(STACK))/mlartifacts --serve-artifacts,http://127.0.0.1:$(MLFLOW_PORT)/health)
	@for pool in local gpu; do $(STACK_ENV) prefect work-pool inspect $$pool > /dev/null 2>&1 || \
		$(STACK_ENV) prefect work-pool create $$pool --type process > /dev/null; \
		echo "work pool $$pool (process)"; done
	$(call start,worker,$(BIN)/prefect worker start --pool local --name local-$$(hostname),http://127.0.0.1:$(PREFECT_PORT)/api/health)

deploy: install
	@$(STACK_ENV) prefect --no-prompt deploy --all

pipeline: install
	@$(STACK_ENV) prefect deployment run 'training-pipeline/digits' --watch
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_PORT)/runs  MLflow UI: http://127.0.0.1:$(MLFLOW_PORT)"

stack-down:
	@for name in worker mlflow prefect-server; do \
		if [ -f $(STACK)/$$name.pid ]; then \
			kill -- -$$(cat $(STACK)/$$name.pid) 2>/dev/null && echo "stopped $$name"; \
			rm -f $(STACK)/$$name.pid; \
		fi; \
	done
